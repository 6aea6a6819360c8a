-- Keeps workers' presence keys alive, and drops expired ids from the index.
-- KEYS[1]: the index (a sorted set: worker id -> expiry, server ms);
-- KEYS[2..]: each worker's presence key.
-- ARGV[1]: TTL in ms; ARGV[2]: the presence value (`host=… pid=…`);
-- ARGV[3..]: each worker's id, in KEYS' order.
-- Reply: the number of workers refreshed.
local now = now_ms()
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2], 'PX', ARGV[1])
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i + 1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return #KEYS - 1
