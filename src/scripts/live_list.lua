-- The live members of an expiring index, each with the value of its key.
-- KEYS[1]: the index (a sorted set: member -> expiry, server ms).
-- ARGV[1]: the prefix of the members' keys (a member's key is the prefix
-- followed by its name).
-- Reply: {member, value or '', member, value or '', …}; expired members are
-- dropped.
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = member
  out[#out + 1] = redis.call('GET', ARGV[1] .. member) or ''
end
return out
