-- Race: writes the claimed messages whose lock is still this worker's and
-- that nobody wrote, each with its ACK, in one step.
-- KEYS: output stream, dead-letter stream, the pool's handoff key (see
-- lib.lua's handoff_rule), lock1, ack1, lock2, ack2, …
-- ARGV[1]: the worker; ARGV[2]: the ACK TTL in ms; ARGV[3..5]: the cap (see
-- xadd_for); ARGV[6]: how old a message may be and still be written (see
-- claim.lua); then per message: the target (1 stream, 2 dead-letter
-- stream), its payload hash, the server ms it was published no earlier
-- than, the mark of its position (0: none), the field count n, n values.
-- Returns per message a code and a detail: 0 the lock is not this
-- worker's (or not yet race's, under a handoff), 1 written, 2 in the
-- stream already (or the fenced strategy's, under a handoff), 5 in the stream with
-- another payload (first noticed), 6 too old, 3 refused by the stream (the
-- reason); or, last, 4 stopped for a reason that passes (the reason), the
-- rest not tried. The ACK is set only once the XADD worked.
local xadd = xadd_for(3, 1, 2)
local me = ARGV[1]
local a = 7
local out = {}
local handoff = handoff_rule(KEYS[3], 'race')
for i = 4, #KEYS, 2 do
  local target = tonumber(ARGV[a])
  local hash = ARGV[a + 1]
  local published = ARGV[a + 2]
  local rule = handoff(ARGV[a + 3])
  local n = tonumber(ARGV[a + 4])
  local acked = redis.call('GET', KEYS[i + 1])
  if rule ~= 'yes' then
    out[#out + 1] = rule == 'no' and 2 or 0
    out[#out + 1] = false
  elseif redis.call('GET', KEYS[i]) ~= me then
    out[#out + 1] = 0
    out[#out + 1] = false
  elseif acked then
    out[#out + 1] = acked_code(KEYS[i + 1], acked, hash, ARGV[2])
    out[#out + 1] = false
  elseif too_old(published, ARGV[6]) then
    out[#out + 1] = 6
    out[#out + 1] = false
  elseif write_and_ack(xadd, target, a + 5, a + 4 + n, KEYS[i + 1], hash, ARGV[2], out) then
    return out
  end
  a = a + 5 + n
end
return out
