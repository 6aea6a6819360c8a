-- The publisher's batch, on one server, in one step: publishes it and, when
-- no bridge worker was subscribed, writes it to the stream itself (the
-- fast path).
-- KEYS[1]: the batch's marker; KEYS[2]: the stream; KEYS[3]: its
-- dead-letter stream.
-- ARGV[1]: the bridge's probe channel; ARGV[2]: PUBLISH or SPUBLISH;
-- ARGV[3]: the channel; ARGV[4]: the marker's lifetime in ms; ARGV[5]: the
-- server ms after which this batch may no longer be sent (its first
-- attempt plus the publisher's --retry-for: well before the marker can have
-- expired); ARGV[6]: 1 when the fast path is on; ARGV[7]: the publisher's
-- name (consumer_id); ARGV[8..10]: the cap (see xadd_for); ARGV[11]: ms
-- after the first attempt within which a batch sent again is published
-- again (below the bridge's DEDUP_WINDOW); ARGV[12]: the messages' ids,
-- each as "<length>:<id>", one after the other (read only by the fast
-- path: a Lua string per message fewer); ARGV[13]: with MIN_REPLICAS_ACKED,
-- the server ms of the part's first attempt on any server ('' otherwise: the
-- marker's first run): a publisher that followed a failover sends it again
-- on the new primary, where no marker is, and it is published again only
-- within ARGV[11] of that first attempt; then the payloads.
-- A batch sent again (Redis did not confirm it) finds the marker of the
-- attempt that ran: the fast path goes on where it stopped and writes
-- nothing twice. A batch that was published is published again while that
-- is within ARGV[11]: a server that stops right after running a script
-- never sends its output to the subscribers, and the bridge writes a
-- message id it has seen within DEDUP_WINDOW once; while no bridge worker
-- is subscribed (they are reconnecting), the script refuses (NOBRIDGE)
-- and the publisher sends it again later. Past ARGV[11], it is not
-- published again (and, with no bridge worker subscribed, given up).
-- The marker holds "<bridge subscriptions>:<number of the next message to
-- write, 0 when none>:<written>:<dead-lettered>:<refused>:<first attempt
-- ms>".
-- Returns {bridge subscriptions, written, dead-lettered, refused}, or
-- {-1} when the batch came too late to be sent safely, or {-2} when it
-- ran once and no bridge worker has been subscribed since to take it
-- again (perhaps lost).
local now = now_ms()
if now > tonumber(ARGV[5]) then
  return {-1}
end
local first_payload = 14
local function publish()
  for i = first_payload, #ARGV do
    redis.call(ARGV[2], ARGV[3], ARGV[i])
  end
end
-- The ids of ARGV[12], in order.
local function ids()
  local out, at, packed = {}, 1, ARGV[12]
  while at <= #packed do
    local colon = string.find(packed, ':', at, true)
    local length = tonumber(string.sub(packed, at, colon - 1))
    out[#out + 1] = string.sub(packed, colon + 1, colon + length)
    at = colon + length + 1
  end
  return out
end
local state = redis.call('GET', KEYS[1])
local bridge, next, stored, dead, refused, first
local function value()
  return table.concat({int(bridge), int(next), int(stored), int(dead), int(refused), int(first)}, ':')
end
if state then
  bridge, next, stored, dead, refused, first = string.match(state, '^(%d+):(%d+):(%d+):(%d+):(%d+):(%d+)$')
  bridge, next, stored, dead, refused, first = tonumber(bridge), tonumber(next), tonumber(stored),
    tonumber(dead), tonumber(refused), tonumber(first)
  -- Published again only to a bridge: a server that stopped right after
  -- the first attempt restarts before the workers subscribe again, and
  -- what it published then would reach nobody. The publisher tries again
  -- in a moment (NOBRIDGE); past ARGV[11] it gives the batch up ({-2}).
  if bridge > 0 and redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2] == 0 then
    if now - first > tonumber(ARGV[11]) then
      return {-2}
    end
    return redis.error_reply('NOBRIDGE the batch ran once but may not have reached the bridge, and no bridge worker is subscribed to take it again')
  end
  if bridge > 0 and now - first <= tonumber(ARGV[11]) then
    publish()
  end
else
  bridge = redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]
  next = (bridge == 0 and ARGV[6] == '1') and 1 or 0
  stored, dead, refused, first = 0, 0, 0, math.min(now, tonumber(ARGV[13]) or now)
  -- The marker first. A server that refuses writes for now (out of memory,
  -- too few replicas) still publishes, without a marker (sent again, the
  -- batch is published again: the bridge writes an id once within
  -- DEDUP_WINDOW); the fast path, which writes, waits for writes to be
  -- taken again.
  local reason = try(function() redis.call('SET', KEYS[1], value(), 'PX', ARGV[4]) end)
  if reason and next > 0 then
    return redis.error_reply(reason)
  end
  publish()
end
if next > 0 then
  local xadd = xadd_for(8, 2, 3)
  local id_of = ids()
  while first_payload + next - 1 <= #ARGV do
    local id, payload = id_of[next], ARGV[first_payload + next - 1]
    local reason, passes = try(function()
      xadd(1, 'message_id', id, 'payload', payload, 'consumer_id', ARGV[7])
    end)
    if passes then
      redis.call('SET', KEYS[1], value(), 'KEEPTTL')
      return redis.error_reply(reason)
    elseif not reason then
      stored = stored + 1
    elseif try(function()
      xadd(2, 'message_id', id, 'reason', 'the stream refused it: ' .. reason,
        'channel', ARGV[3], 'payload', payload, 'consumer_id', ARGV[7])
    end) then
      refused = refused + 1
    else
      dead = dead + 1
    end
    next = next + 1
  end
  next = 0
  redis.call('SET', KEYS[1], value(), 'KEEPTTL')
end
return {bridge, stored, dead, refused}
