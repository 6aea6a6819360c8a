-- MIN_REPLICAS_ACKED: the writer found that enough replicas hold its writes
-- up to a position (WAIT); standbys drop their copies only up to it.
-- KEYS[1]: the writer record. ARGV[1]: the writer's epoch; ARGV[2]: its
-- member name; ARGV[3]: the position confirmed.
-- Sets the record's `safe` to ARGV[3] when the record is still the
-- writer's and it moves `safe` forward. Returns 1 if set, 0 if not.
local rec = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'safe')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then
  return 0
end
local function before(a, b)
  local am, as = string.match(a, '^(%d+):(%d+)$')
  local bm, bs = string.match(b, '^(%d+):(%d+)$')
  if not am or not bm then return false end
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
if rec[3] and not before(rec[3], ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], 'safe', ARGV[3])
return 1
