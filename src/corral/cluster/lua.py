"""The Lua scripts the cluster runs in Redis: each one round trip, atomic, on Redis' own clock.

Time is always Redis' ``TIME`` (never a replica's clock, which may drift): expiries are
milliseconds, and the *stamp* that orders announcements is microseconds as a decimal string
(``TIME``'s seconds followed by its six-digit microseconds), since a Lua number would print a
large integer in exponent form.

The scripts read keys they build from a prefix (the state hashes) or publish on channels passed
as arguments: corral's cluster needs one Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = t[1] .. string.format('%06d', tonumber(t[2]))
"""

# KEYS[1] the backend's slot set (member: unit id, score: expiry in ms).
# ARGV: limit, lease_ms, channel, replica, backend id, then the ids of the units wanted.
# Grants as many of them as the limit leaves free (dropping expired units first).
# Returns {units granted, units now held fleet-wide, stamp}; announces a grant on the channel.
GRANT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
local k = math.min(#ARGV - 5, tonumber(ARGV[1]) - n)
if k <= 0 then
  return {0, n, stamp}
end
local lease = tonumber(ARGV[2])
for i = 1, k do
  redis.call('ZADD', KEYS[1], now + lease, ARGV[5 + i])
end
redis.call('PEXPIRE', KEYS[1], 2 * lease)
n = n + k
redis.call('PUBLISH', ARGV[3], n .. ' ' .. stamp .. ' ' .. ARGV[4] .. ' ' .. ARGV[5])
return {k, n, stamp}
"""
)

# KEYS[1] the backend's slot set. ARGV: channel, replica, backend id, then the units given
# back. Returns {units now held fleet-wide, stamp}; announces the freed units on the channel.
RETURN = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 4, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
local n = redis.call('ZCARD', KEYS[1])
redis.call('PUBLISH', ARGV[1], n .. ' ' .. stamp .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return {n, stamp}
"""
)

# The heartbeat (and the resynchronisation after an outage): for each slot set in KEYS, extend
# (or re-add) this replica's units, remove the ones it gave back while Redis was away,
# drop expired ones, and count. ARGV: lease_ms, then per key: n, n unit ids to hold, m,
# m unit ids to forget. Returns {stamp, count per key...}.
TICK = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
local out = {stamp}
local i = 2
for k = 1, #KEYS do
  local key = KEYS[k]
  local hold = tonumber(ARGV[i])
  i = i + 1
  for j = 1, hold do
    redis.call('ZADD', key, now + lease, ARGV[i])
    i = i + 1
  end
  local forget = tonumber(ARGV[i])
  i = i + 1
  for j = 1, forget do
    redis.call('ZREM', key, ARGV[i])
    i = i + 1
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if hold > 0 then
    redis.call('PEXPIRE', key, 2 * lease)
  end
  out[#out + 1] = redis.call('ZCARD', key)
end
return out
"""
)

# KEYS: the kind's hash, the version counter, the set of kinds.
# ARGV: kind, key, deleted '1'|'0', value (JSON), channel, origin replica.
# Returns the new version; announces "version\\norigin\\nkind\\nkey\\ndeleted\\nvalue".
STATE_SET = """
if ARGV[3] == '1' then
  redis.call('HDEL', KEYS[1], ARGV[2])
else
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
  redis.call('SADD', KEYS[3], ARGV[1])
end
local v = redis.call('INCR', KEYS[2])
local nl = '\\n'
redis.call('PUBLISH', ARGV[5],
  v .. nl .. ARGV[6] .. nl .. ARGV[1] .. nl .. ARGV[2] .. nl .. ARGV[3] .. nl .. ARGV[4])
return v
"""

# KEYS: the version counter, the set of kinds. ARGV[1]: the prefix of the kinds' hashes.
# Returns {version, kind, {field, value, ...}, kind, {...}, ...}: one consistent snapshot.
STATE_READ = """
local out = {redis.call('GET', KEYS[1]) or '0'}
for _, kind in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  out[#out + 1] = kind
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. kind)
end
return out
"""

# A token bucket. KEYS[1]: the bucket's hash. ARGV: rate per second, burst.
# Returns {taken 0|1, tokens left as text}.
BUCKET = (
    _NOW
    + """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t2 = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(v[1]) or burst
local at = tonumber(v[2]) or t2
tokens = math.min(burst, tokens + math.max(0, t2 - at) / 1000 * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(t2))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {taken, tostring(tokens)}
"""
)

# KEYS[1]: the leader lock. ARGV: this replica, ttl_ms.
# Takes the lock when free, extends it when this replica holds it.
# Returns {1, ttl_ms} when this replica leads, else {0, the lock's remaining ms}.
LEADER_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, tonumber(ARGV[2])}
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(ARGV[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
"""

# KEYS[1]: the leader lock. ARGV[1]: this replica. Gives the lock up if this replica holds it.
LEADER_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
