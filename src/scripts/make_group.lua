-- `optimus work`: makes the consumer group (from the start of the stream,
-- and the stream if it is missing) unless it exists, and sets its marker.
-- KEYS[1]: the stream; KEYS[2]: the group's marker.
-- ARGV[1]: the group; ARGV[2]: this consumer; ARGV[3]: `again` when the
-- group was found missing.
-- Reply: 1 when the group is there. Found missing with its marker there,
-- the group was deleted (Redis kept its data): 0, unless it is back already
-- (1).
if ARGV[3] == 'again' and redis.call('EXISTS', KEYS[2]) == 1 then
  if pcall(redis.call, 'XGROUP', 'CREATECONSUMER', KEYS[1], ARGV[1], ARGV[2]) then return 1 end
  return 0
end
local made, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if not made and not string.match(err.err or tostring(err), '^BUSYGROUP') then
  return redis.error_reply(err.err or tostring(err))
end
redis.call('SET', KEYS[2], '1')
return 1
