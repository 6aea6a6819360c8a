-- Writes messages without a lock, each only if its ACK does not exist yet
-- (setting it once the XADD worked): the publisher's fast path on a
-- cluster, where the ACK keys of the race strategy keep it single.
-- KEYS: output stream, dead-letter stream, ack1, ack2, …
-- ARGV[1]: the ACK TTL in ms; ARGV[2..4]: the cap (see xadd_for); then per
-- message: the target (1 stream, 2 dead-letter stream), its payload hash,
-- the field count n, n values.
-- Returns per message a code and a detail as race_write.lua does (without
-- 0 and 6).
local xadd = xadd_for(2, 1, 2)
local a = 5
local out = {}
for i = 3, #KEYS do
  local target = tonumber(ARGV[a])
  local hash = ARGV[a + 1]
  local n = tonumber(ARGV[a + 2])
  local acked = redis.call('GET', KEYS[i])
  if acked then
    out[#out + 1] = acked_code(KEYS[i], acked, hash, ARGV[1])
    out[#out + 1] = false
  elseif write_and_ack(xadd, target, a + 3, a + 2 + n, KEYS[i], hash, ARGV[1], out) then
    return out
  end
  a = a + 3 + n
end
return out
