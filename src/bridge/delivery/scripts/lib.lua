-- Helpers every script of the protocol starts with (scripts.rs prepends this
-- file to each). Numbers that leave a script go through string.format('%d'):
-- Lua would otherwise print a large one as 1.8e+15.

-- The server's time in milliseconds.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A number as the text Redis stores.
local function int(n)
  return string.format('%d', n)
end

-- The seal of this server's marks: its run_id, which changes with every
-- start of redis-server (and so is the same for every connection a reader
-- can have had since its handshake) and which a client that may only
-- PUBLISH or SUBSCRIBE cannot learn.
local function seal()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end

-- A mark as it is published: "<value>:<tag>", the tag being the first 16
-- hex digits of SHA1("<seal>:<value>"). A reader knows the seal from its
-- handshake and takes only marks whose tag is right: a number published on
-- the marks channel by anything but this server's scripts (a careless
-- client, a tool forwarding another server's channels) is not a mark.
local function sealed(value)
  local text = int(value)
  return text .. ':' .. string.sub(redis.sha1hex(seal() .. ':' .. text), 1, 16)
end

-- How far the clock leaps (ms times 1024) on a replica promoted in a
-- failover: 5 s.
local PROMOTION_LEAP = 5000 * 1024

-- Takes the next value of the clock in KEYS[clock] and publishes it on
-- `channel` (a mark), with SPUBLISH when `sharded` is '1' (a cluster's
-- sharded Pub/Sub: the channel shares the clock's slot). The clock never goes back, even when its key is gone
-- (a server restarted without persistence, or an older snapshot restored):
-- a value is at least the server time in ms times 1024.
-- With MIN_REPLICAS_ACKED (a pool whose writer noted the replication
-- history in `<clock>:history`: "<master_replid>:<value last leapt
-- to>:<leaps so far>", see confirm.lua), the clock leaps PROMOTION_LEAP
-- ahead once on a replica promoted in a failover (its previous history,
-- master_replid2, is the one noted): the old primary may go on making
-- marks of about the same values for a moment, and the messages a worker
-- received there must come before every position of the new primary (or
-- the record would pass them unwritten). The leaps stay added to the
-- server time, so that marks keep pace with it. Without the note nothing
-- of this is done.
-- Returns the value, and the value the clock last leapt to (0: never), by
-- which a gap across the leap is measured without it.
local function next_mark(clock, channel, sharded)
  local history_key = KEYS[clock] .. ':history'
  local noted = redis.call('GET', history_key)
  local leapt, ahead, history = 0, 0, nil
  if noted then
    local replid, at, by = string.match(noted, '^(%x+):(%d+):(%d+)$')
    leapt, ahead = tonumber(at) or 0, tonumber(by) or 0
    local info = redis.call('INFO', 'replication')
    history = string.match(info, 'master_replid:(%x+)')
    if history == replid then
      history = nil
    elseif replid and replid == string.match(info, 'master_replid2:(%x+)') then
      ahead = ahead + PROMOTION_LEAP
      leapt = -1
    end
  end
  local value = math.max((tonumber(redis.call('GET', KEYS[clock])) or 0) + 1, now_ms() * 1024 + ahead)
  if leapt < 0 then
    leapt = value
  end
  if history then
    redis.call('SET', history_key, history .. ':' .. int(leapt) .. ':' .. int(ahead))
  end
  redis.call('SET', KEYS[clock], int(value))
  redis.call(sharded == '1' and 'SPUBLISH' or 'PUBLISH', channel, sealed(value))
  return value, leapt
end

-- An XADD for entries: ARGV[first..first+2] say how the output stream is
-- capped (kind 0 none, 1 MAXLEN, 2 MINID by age in ms; the operator ~ or =;
-- the limit); KEYS[stream] and KEYS[dead] are the output and dead-letter
-- streams. The function adds an entry of the fields and values it is given
-- to `target`: 1 the output stream, 2 the dead-letter stream.
local function xadd_for(first, stream, dead)
  local trim, op, limit = tonumber(ARGV[first]), ARGV[first + 1], tonumber(ARGV[first + 2])
  local minid
  if trim == 2 then
    minid = now_ms() - limit
    if minid < 0 then minid = 0 end
  end
  return function(target, ...)
    if target ~= 1 then
      redis.call('XADD', KEYS[dead], '*', ...)
    elseif trim == 1 then
      redis.call('XADD', KEYS[stream], 'MAXLEN', op, limit, '*', ...)
    elseif trim == 2 then
      redis.call('XADD', KEYS[stream], 'MINID', op, int(minid), '*', ...)
    else
      redis.call('XADD', KEYS[stream], '*', ...)
    end
  end
end

-- Refusals that pass (out of memory, too few replicas, a read-only
-- replica, a loading, busy or misconfigured server): try again later.
local passing = {OOM = true, NOREPLICAS = true, READONLY = true, MASTERDOWN = true,
  LOADING = true, BUSY = true, TRYAGAIN = true, CLUSTERDOWN = true, MISCONF = true}
-- Refusals of us: they end the script with that error, for the process to
-- stop (retrying or dead-lettering cannot mend them).
local refused_us = {NOPERM = true, NOAUTH = true, WRONGPASS = true}

-- A write's error (as pcall caught it): Redis's (or Lua's) reason, whether
-- that refusal passes, and whether it refuses us.
local function classify(err)
  local reason = type(err) == 'table' and err.err or tostring(err)
  local code = string.match(reason, '^(%u+)') or ''
  return reason, passing[code] == true, refused_us[code] == true
end

-- As `classify`; a refusal of us ends the script.
local function refusal(err)
  local reason, passes, us = classify(err)
  if us then error(err) end
  return reason, passes
end

-- Runs `add` (a write): nil when it worked; else as `refusal`.
local function try(add)
  local ok, err = pcall(add)
  if ok then return nil end
  return refusal(err)
end

-- Adds ARGV[from..to] (field, value, …) to `target` with `xadd`, as `try`
-- does (the unpack, which fails for thousands of fields, is tried too).
local function try_xadd(xadd, target, from, to)
  return try(function() xadd(target, unpack(ARGV, from, to)) end)
end

-- The strategy handoff (`optimus ctl strategy`, see members.rs): the key
-- holds "<target strategy>" until a process of that strategy takes the
-- handoff mark H, then "<target>:<H>"; a pool handed back after an earlier
-- handoff at F carries F too ("<target>::<F>", "<target>:<H>:<F>"). Before
-- F, messages are the target strategy's (written before the earlier
-- handoff); from F to H the other's; from H on the target's. Returns a
-- function telling `mine` (this script's strategy) about a message by the
-- mark of its position: 'yes' it may write it, 'no' it is the other
-- strategy's (drop the copy), 'wait' it may be ours once H is taken. A
-- message without a position (mark 0: a cluster's) is always 'yes'.
local function handoff_rule(key, mine)
  local value = redis.call('GET', key)
  local target, at, floor
  if value then
    target, at, floor = string.match(value, '^(%a+):?(%d*):?(%d*)$')
    at, floor = tonumber(at), tonumber(floor) or 0
  end
  return function(mark)
    mark = tonumber(mark) or 0
    if not target or mark == 0 then
      return 'yes'
    end
    local ours = target == mine
    if mark < floor then
      return ours and 'yes' or 'no'
    elseif not at then
      return ours and 'wait' or 'yes'
    elseif mark >= at then
      return ours and 'yes' or 'no'
    end
    return ours and 'no' or 'yes'
  end
end

-- The mark of a position ("<mark>:<seq>"), 0 for none.
local function mark_of(position)
  return tonumber(string.match(position or '', '^(%d+)')) or 0
end
