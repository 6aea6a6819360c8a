-- A process's registration for `ctl scale`, and what it needs to take its
-- share of the workers.
-- KEYS[1]: the processes (a sorted set: name -> expiry, server ms);
-- KEYS[2]: the desired total of workers.
-- ARGV[1]: this process's name; ARGV[2]: the registration's TTL in ms
-- (0: leave).
-- Reply: {desired total or false, the live processes' names}.
local now = now_ms()
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {redis.call('GET', KEYS[2]), redis.call('ZRANGE', KEYS[1], 0, -1)}
