-- `optimus work`: an entry that failed MAX_DELIVERIES times goes to the
-- dead-letter stream and is acknowledged, at once.
-- KEYS[1]: the dead-letter stream; KEYS[2]: the stream.
-- ARGV[1]: the entry's id; ARGV[2]: the group; ARGV[3]: the reason;
-- ARGV[4]: the payload.
-- Reply: none.
redis.call('XADD', KEYS[1], '*', 'entry_id', ARGV[1], 'stream', KEYS[2],
    'group', ARGV[2], 'reason', ARGV[3], 'payload', ARGV[4])
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
