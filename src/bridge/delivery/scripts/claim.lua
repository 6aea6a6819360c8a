-- Race: claims a batch's messages. KEYS[1]: the pool's handoff key (see
-- lib.lua's handoff_rule); then lock1, ack1, lock2, ack2, …
-- ARGV[1]: the worker; ARGV[2]: the lock TTL in ms; ARGV[3]: the ACK TTL in
-- ms; ARGV[4]: how old (ms since published) a message may be and still be
-- written; then per message its payload hash, the server ms it was
-- published no earlier than (0: unknown) and the mark of its position (0:
-- none).
-- Returns per message a code and a detail: 0 held by another (or, the pool
-- being handed to race, not race's until the handoff mark is taken), 1
-- won, 2 in the stream already (or the fenced strategy's, under a
-- handoff), 5 in the stream with another payload (first noticed here), 6
-- too old to write safely. A lock this worker already holds (a claim whose
-- write failed, retried) counts as won.
local handoff = handoff_rule(KEYS[1], 'race')
local out = {}
local h = 5
for i = 2, #KEYS, 2 do
  local acked = redis.call('GET', KEYS[i + 1])
  local rule = handoff(ARGV[h + 2])
  if rule == 'no' then
    out[#out + 1] = 2
  elseif rule == 'wait' then
    out[#out + 1] = 0
  elseif acked then
    out[#out + 1] = acked_code(KEYS[i + 1], acked, ARGV[h], ARGV[3])
  elseif too_old(ARGV[h + 1], ARGV[4]) then
    out[#out + 1] = 6
  else
    -- GET, then SET when free: SET NX GET in one command, as Redis 6.2
    -- does not take NX with GET (the script makes the two one step).
    local old = redis.call('GET', KEYS[i])
    if not old then
      redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    end
    if not old or old == ARGV[1] then
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  out[#out + 1] = false
  h = h + 3
end
return out
