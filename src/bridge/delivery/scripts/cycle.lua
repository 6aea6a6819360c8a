-- One process's cycle (every 50 ms): its beat among the members, a mark,
-- and the writer records it asks about.
-- KEYS[1]: the clock, KEYS[2]: the members hash, KEYS[3..]: writer records.
-- ARGV[1]: this process's member name; ARGV[2]: "<the last mark its readers
-- saw (0: none yet)>:<the mark its sequence has been whole since>:<its
-- routes' fingerprint>";
-- ARGV[3]: the marks channel; ARGV[4]: 1 to stay a member, 0 to leave;
-- ARGV[5]: ms after which a silent member is removed.
-- A member's value is "<beat ms>:<last mark seen>:<whole since>:<routes>".
-- Returns {mark, server ms, members (name, value, …), records ({epoch,
-- owner, pos} each), 1 when this process's entry is new (0 if not)}.
local now = now_ms()
local new = 0
if ARGV[4] == '1' then
  new = redis.call('HSET', KEYS[2], ARGV[1], int(now) .. ':' .. ARGV[2])
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
local members = redis.call('HGETALL', KEYS[2])
local kept = {}
for i = 1, #members, 2 do
  local beat = tonumber(string.match(members[i + 1], '^(%d+)')) or 0
  if now - beat > tonumber(ARGV[5]) then
    redis.call('HDEL', KEYS[2], members[i])
  else
    kept[#kept + 1] = members[i]
    kept[#kept + 1] = members[i + 1]
  end
end
local mark = next_mark(1, ARGV[3])
local records = {}
for i = 3, #KEYS do
  records[#records + 1] = redis.call('HMGET', KEYS[i], 'epoch', 'owner', 'pos')
end
return {mark, now, kept, records, new}
