-- The publisher's part on a cluster with sharded Pub/Sub, on the master of
-- the channel's slot, in one step: SPUBLISHes each payload, and tells
-- whether a bridge worker was subscribed (PUBSUB SHARDNUMSUB of the
-- bridge's probe channel, which lives in the channel's slot: other
-- subscribers of the channel, a monitor or a witness, do not count).
-- KEYS[1]: the channel (its slot routes the script); ARGV[1]: the bridge's
-- probe channel; ARGV[2..]: the payloads.
-- Returns, per payload, how many subscribers got it, 0 when no bridge
-- worker was subscribed.
local bridge = redis.call('PUBSUB', 'SHARDNUMSUB', ARGV[1])[2]
local out = {}
for i = 2, #ARGV do
  local got = redis.call('SPUBLISH', KEYS[1], ARGV[i])
  if bridge == 0 then
    got = 0
  end
  out[#out + 1] = got
end
return out
