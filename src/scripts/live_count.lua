-- How many members of an expiring index are live.
-- KEYS[1]: the index (a sorted set: member -> expiry, server ms).
-- Reply: the number of live members (expired ones are dropped).
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
