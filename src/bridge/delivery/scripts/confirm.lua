-- MIN_REPLICAS_ACKED: how far the replicas hold a writer's writes, in two
-- steps on the writer's waiting connection (see `Fenced::start_waits`).
-- KEYS[1]: the writer record; KEYS[2]: the pool clock's history note (see
-- `next_mark`: 'ask' notes the server's replication history there when
-- there is none, which turns the clock's leap on). ARGV[1]: the writer's
-- epoch; ARGV[2]: its member name; ARGV[3]: a position it wrote; ARGV[4]:
-- 'ask' or 'set'.
-- 'ask' (followed by WAIT on the same connection): when the record is the
-- writer's and has reached ARGV[3], notes it in the record's `asked` (a
-- write, so that the WAIT after it counts the replicas holding the record
-- as it is now, and with it every entry written up to it). 'set' (once
-- the WAIT found enough replicas): moves the record's `safe`, how far
-- standbys drop their copies, forward to ARGV[3], if the record is still
-- the writer's and has reached it. Returns 1 if done, 0 if not.
-- On a cluster the history note lives in the channel's slot, apart from
-- the record: 'ask' gets no KEYS[2], and 'note' (KEYS[1]: the note) notes
-- the history there when there is none.
local function note(key)
  if redis.call('EXISTS', key) == 0 then
    local history = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
    redis.call('SET', key, history .. ':0:0')
  end
end
if ARGV[4] == 'note' then
  note(KEYS[1])
  return 1
end
local rec = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'pos', 'safe')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then
  return 0
end
-- Whether position a comes before position b ("<mark>:<seq>").
local function before(a, b)
  local am, as = string.match(a or '', '^(%d+):(%d+)$')
  local bm, bs = string.match(b or '', '^(%d+):(%d+)$')
  if not am or not bm then return false end
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
if not rec[3] or before(rec[3], ARGV[3]) then
  return 0
end
if ARGV[4] == 'ask' then
  if KEYS[2] then
    note(KEYS[2])
  end
  redis.call('HSET', KEYS[1], 'asked', ARGV[3])
  return 1
end
-- (Already there: a takeover's predecessor, or a reply lost.)
if rec[4] and not before(rec[4], ARGV[3]) then
  return 1
end
redis.call('HSET', KEYS[1], 'safe', ARGV[3])
return 1
