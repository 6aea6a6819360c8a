-- Helpers of the scripts that keep an ACK key per message (the race
-- strategy, and the publisher's fast path on a cluster).

-- The code for a message whose ACK exists: 2 when the ACK is this
-- message's (or says nothing of its bytes); when it holds another payload's
-- hash (a publisher reused the id), 5 for the one call that notices it first
-- (a marker beside the ACK says it was noticed) and 2 for every other: the
-- reuse is counted once, pool-wide.
local function acked_code(ack, acked, hash, ttl)
  if string.len(acked) ~= 16 or acked == hash then return 2 end
  if redis.call('SET', ack .. ':reused:' .. hash, 1, 'NX', 'PX', ttl) then return 5 end
  return 2
end

-- Whether a message published no earlier than `published` (server ms; 0:
-- unknown) may have had its ACK expire already, so that writing it now
-- could write it twice: then the copy is dropped, whatever pause kept it.
local function too_old(published, ttl)
  local p = tonumber(published) or 0
  return p > 0 and now_ms() - p > tonumber(ttl)
end

-- Writes one message and, only if that worked, its ACK; appends its code
-- and detail to `out`. Returns true when the script must stop here (a
-- refusal that passes).
local function write_and_ack(xadd, target, from, to, ack, hash, ttl, out)
  local reason, passes = try_xadd(xadd, target, from, to)
  if passes then
    out[#out + 1] = 4
    out[#out + 1] = reason
    return true
  elseif reason then
    out[#out + 1] = 3
    out[#out + 1] = reason
  else
    redis.call('SET', ack, hash, 'PX', ttl)
    out[#out + 1] = 1
    out[#out + 1] = false
  end
  return false
end
