-- One process's cycle (every 50 ms): its beat among the members, a mark,
-- and the writer records it asks about.
-- KEYS[1]: the clock, KEYS[2]: the members hash, KEYS[3]: the pool's
-- handoff key (see lib.lua's handoff_rule), KEYS[4..]: writer records.
-- ARGV[1]: this process's member name; ARGV[2]: "<the last mark its readers
-- saw (0: none yet)>:<the mark its sequence has been whole since>:<its
-- routes' fingerprint>";
-- ARGV[3]: the marks channel; ARGV[4]: 1 to stay a member, 0 to leave;
-- ARGV[5]: ms after which a silent member is removed; ARGV[6]: its
-- strategy (fenced, race); ARGV[7]: ms within which a member that beat
-- counts as live for the strategies' check; ARGV[8]: '1' to publish the
-- mark with SPUBLISH (sharded Pub/Sub on a cluster, where the records live
-- in other slots and are read apart: no KEYS[4..]);
-- ARGV[9]: the most processes that hold copies (STANDBYS + 1; 0: every
-- process does); ARGV[10]: "<held>:<may>": since when (server ms) this
-- process holds copies (0: it waits), and what it may do: 'c' claim a
-- place among the holders, 'r' release its place (it writes nothing), '-'
-- neither; ARGV[11]: ms within which a holder that beat counts as live.
-- A member's value is "<beat ms>:<last mark seen>:<whole since>:<routes>:
-- <strategy>:<joined ms>[:<held ms>]" (held only when places are bounded;
-- an older optimus's ends after <routes>: it is a fenced one; a value
-- without held holds copies).
-- The holders: the live members of this strategy whose held is not 0
-- (live: silent for at most ARGV[11] counted from the newest beat in the
-- hash, so that a Redis that stalled, and kept every process from beating,
-- makes no holder look gone). A process that waits takes a place when
-- fewer than ARGV[9] hold copies. One that holds gives its place back when
-- ARGV[9] others come before it: whole since an earlier mark (more
-- complete), or as complete and holding since earlier (a holder back from
-- a pause, or Redis lost the hash and two took one place).
-- One pool, one strategy: a process whose strategy is not that of the live
-- members is not let in (or, a member already, is put out when it joined
-- after one of them), and nothing else is done. While a handoff is asked
-- for, both strategies are let in, but a newcomer of the strategy handed
-- from once H is taken is not (it could write nothing). The first process
-- of the target strategy whose sequence is whole takes H: this cycle's
-- mark.
-- Returns {mark, server ms, members (name, value, …), records ({epoch,
-- owner, pos, safe} each; safe: the position MIN_REPLICAS_ACKED replicas
-- were known to hold, see confirm.lua), 1 when this process's entry is new (0 if not),
-- the live members of another strategy that keep it out ("" when none:
-- "<name>=<strategy>", comma-separated; "handoff" when the handoff keeps
-- it out), 1 when the clock was missing (a new pool, or the key deleted or
-- lost with Redis's data), the handoff key's value ("" when none), since
-- when this process holds copies (0: it waits)}.
local now = now_ms()
local live = tonumber(ARGV[7])
local members = redis.call('HGETALL', KEYS[2])
local function parse(value)
  local beat, since = string.match(value, '^(%d+):%d+:(%d+)')
  local strategy, joined, held =
    string.match(value, '^%d+:%d+:%d+:%d+:(%a+):(%d+):?(%d*)$')
  if held == nil or held == '' then
    held = 1
  end
  return tonumber(beat) or 0, strategy or 'fenced', tonumber(joined or 0), tonumber(held),
    tonumber(since) or 0
end
local joined
for i = 1, #members, 2 do
  if members[i] == ARGV[1] then
    local _, _, at = parse(members[i + 1])
    joined = at
  end
end
local handoff = redis.call('GET', KEYS[3])
local target, at, floor
if handoff then
  target, at, floor = string.match(handoff, '^(%a+):?(%d*):?(%d*)$')
  at = tonumber(at)
end
local kept, others, refused = {}, {}, false
local limit = tonumber(ARGV[9])
local held, may = string.match(ARGV[10], '^(%d+):(.)$')
held = tonumber(held)
local whole = tonumber(string.match(ARGV[2], '^%d+:(%d+):')) or 0
local newest = 0
for i = 2, #members, 2 do
  newest = math.max(newest, (parse(members[i])))
end
-- Whether a holder comes before this process (see above).
local function before_me(name, since, since_held)
  if held == 0 then
    return true
  elseif since ~= whole then
    return since < whole
  elseif since_held ~= held then
    return since_held < held
  end
  return name < ARGV[1]
end
-- The live holders that would keep this process out of a place.
local ahead = 0
for i = 1, #members, 2 do
  local name, value = members[i], members[i + 1]
  local beat, strategy, at, since_held, since = parse(value)
  if name == ARGV[1] then
    -- (put back below)
  elseif now - beat > tonumber(ARGV[5]) then
    redis.call('HDEL', KEYS[2], name)
  else
    if strategy == ARGV[6] and since_held > 0 and newest - beat <= tonumber(ARGV[11])
        and before_me(name, since, since_held) then
      ahead = ahead + 1
    end
    kept[#kept + 1] = name
    kept[#kept + 1] = value
    if strategy ~= ARGV[6] and now - beat <= live and not target then
      others[#others + 1] = name .. '=' .. strategy
      -- The one that joined later gives way (a newcomer always does).
      if not joined or at <= joined then
        refused = true
      end
    end
  end
end
if ARGV[4] == '1' and refused then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return {0, now, {}, {}, 0, table.concat(others, ','), 0, handoff or '', 0}
end
if ARGV[4] == '1' and target and target ~= ARGV[6] and at and not joined then
  return {0, now, {}, {}, 0, 'handoff', 0, handoff, 0}
end
if limit == 0 then
  if held == 0 then
    held = now
  end
elseif held == 0 and may == 'c' and ahead < limit then
  held = now
elseif held > 0 and may == 'r' and ahead >= limit then
  held = 0
end
local new = 0
if ARGV[4] == '1' then
  local value = int(now) .. ':' .. ARGV[2] .. ':' .. ARGV[6] .. ':' .. int(joined or now)
  if limit > 0 then
    value = value .. ':' .. int(held)
  end
  new = redis.call('HSET', KEYS[2], ARGV[1], value)
  kept[#kept + 1] = ARGV[1]
  kept[#kept + 1] = redis.call('HGET', KEYS[2], ARGV[1])
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
local clock_missing = redis.call('EXISTS', KEYS[1]) == 0 and 1 or 0
local mark = next_mark(1, ARGV[3], ARGV[8])
-- H: every message after this mark reaches this process, subscribed (and
-- whole) since an earlier one.
local since = string.match(ARGV[2], '^%d+:(%d+):')
if ARGV[4] == '1' and target == ARGV[6] and not at and since ~= '18446744073709551615'
    and since ~= '0' then
  handoff = target .. ':' .. int(mark)
  if floor and floor ~= '' then
    handoff = handoff .. ':' .. floor
  end
  redis.call('SET', KEYS[3], handoff)
end
local records = {}
for i = 4, #KEYS do
  records[#records + 1] = redis.call('HMGET', KEYS[i], 'epoch', 'owner', 'pos', 'safe')
end
return {mark, now, kept, records, new, '', clock_missing, handoff or '', held}
