-- The fenced write: a batch of one stream's messages, in their order, by its
-- writer; nothing when the writer was fenced or when the record is not
-- where the batch starts.
-- KEYS[1]: the writer record, KEYS[2]: the stream, KEYS[3]: its dead-letter
-- stream, KEYS[4]: the pool's handoff key (a batch reaching past the
-- handoff mark of a pool handed to race, or before the mark of one handed
-- to fenced, is not written: the record is "elsewhere"). ARGV[1]: the writer's epoch; ARGV[2]: the position the record must
-- hold ('' for none); ARGV[3]: the position after the whole batch; ARGV[4]:
-- the writer's member name, its entries' consumer_id (an epoch taken in the
-- same millisecond as one a lost record held can be equal to it; the owner
-- tells them apart); ARGV[5..7]: the cap (see xadd_for); then per message:
-- its position and its kind, then
--   kind 0: nothing (passed over: only recorded);
--   kind 1: its id and payload (an envelope entry in the stream);
--   kind 2: a field count n and n values (an entry in the stream);
--   kind 3: a field count n and n values (an entry in the dead-letter stream).
-- Returns {0, epoch, position}: fenced, nothing written; {1, position}: the
-- record is elsewhere, nothing written; {2, n}: all n written, the record
-- at ARGV[3] ({5, n}: the same, and the stream had been missing though
-- the record held a position: deleted, or lost); {3, n, reason}: the first n written, then a refusal that
-- passes; {4, n, reason}: the first n written, then the stream refused the
-- next one for good. The record's position is that of the last message
-- written: nothing is recorded that was not written.
local rec = redis.call('HMGET', KEYS[1], 'epoch', 'owner', 'pos')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[4] then
  return {0, rec[1] or false, rec[3] or false}
end
if (rec[3] or '') ~= ARGV[2] then
  return {1, rec[3] or false}
end
-- Positions grow through the batch: its first and its last tell.
if #ARGV >= 8 then
  local rule = handoff_rule(KEYS[4], 'fenced')
  if rule(mark_of(ARGV[8])) ~= 'yes' or rule(mark_of(ARGV[3])) ~= 'yes' then
    return {1, rec[3] or false}
  end
end
local stream, dead, me = KEYS[2], KEYS[3], ARGV[4]
local trim, op, limit = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local add
if trim == 1 then
  add = function(...) redis.call('XADD', stream, 'MAXLEN', op, limit, '*', ...) end
elseif trim == 2 then
  local minid = now_ms() - limit
  if minid < 0 then minid = 0 end
  minid = int(minid)
  add = function(...) redis.call('XADD', stream, 'MINID', op, minid, '*', ...) end
else
  add = function(...) redis.call('XADD', stream, '*', ...) end
end
-- The stream gone though the record says something was written: deleted
-- (or lost with Redis's data); the first XADD makes it anew.
local missing = (rec[3] or '') ~= '' and redis.call('EXISTS', stream) == 0
-- One pcall for the batch: `done` and `last` say how far it went.
local a, done, last = 8, 0, ARGV[2]
local ok, err = pcall(function()
  local count = #ARGV
  while a <= count do
    local kind, next = ARGV[a + 1], 0
    if kind == '1' then
      add('message_id', ARGV[a + 2], 'payload', ARGV[a + 3], 'consumer_id', me)
      next = a + 4
    elseif kind == '0' then
      next = a + 2
    else
      local n = tonumber(ARGV[a + 2])
      if kind == '2' then
        add(unpack(ARGV, a + 3, a + 2 + n))
      else
        redis.call('XADD', dead, '*', unpack(ARGV, a + 3, a + 2 + n))
      end
      next = a + 3 + n
    end
    done = done + 1
    last = ARGV[a]
    a = next
  end
end)
if not ok then
  local reason, passes, us = classify(err)
  if last ~= '' then
    redis.call('HSET', KEYS[1], 'pos', last)
  end
  -- A refusal of us ends the script, once what was written is recorded.
  if us then error(err) end
  return {passes and 3 or 4, done, reason}
end
redis.call('HSET', KEYS[1], 'pos', ARGV[3])
if missing then
  return {5, done}
end
return {2, done}
