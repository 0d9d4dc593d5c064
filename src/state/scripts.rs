//! The Lua scripts that change shared state in the store, each one atomic (Redis runs a script
//! alone), so replicas never race on a read-modify-write. Time is the store's own clock
//! (`TIME`), so replicas with skewed clocks agree. Every key expires on its own when unused.
//!
//! Buckets are hashes `{l: level, u: updated (ms)}` refilled continuously up to one minute's
//! allowance, as `access::limits::Bucket` does in one process. Leases are a sorted set of lease
//! ids scored by their expiry (ms): a replica that dies stops renewing and its leases lapse.

/// Admits one request. KEYS: rpm bucket, tpm bucket, leases. ARGV: rpm, tpm, max_concurrent,
/// inference (0/1), lease id, lease ttl (ms). Returns `{0, 0}` when admitted (charged one request,
/// lease taken), else `{limit, retry_after_ms}` with limit 1 rpm, 2 tpm, 3 concurrency.
pub(crate) const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local inference, lease, ttl = ARGV[4] == '1', ARGV[5], tonumber(ARGV[6])
local function level(key, per_minute)
  local v = redis.call('HMGET', key, 'l', 'u')
  local l, u = tonumber(v[1]), tonumber(v[2])
  if l == nil or u == nil then return per_minute end
  return math.min(per_minute, l + math.max(0, now - u) * per_minute / 60000)
end
if inference and tpm > 0 then
  local l = level(KEYS[2], tpm)
  if l <= 0 then return {2, math.max(1, math.ceil((1 - l) * 60000 / tpm))} end
end
if inference and maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= maxc then return {3, 1000} end
end
if rpm > 0 then
  local l = level(KEYS[1], rpm)
  if l < 1 then return {1, math.max(1, math.ceil((1 - l) * 60000 / rpm))} end
  redis.call('HSET', KEYS[1], 'l', l - 1, 'u', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if inference and maxc > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, lease)
  redis.call('PEXPIRE', KEYS[3], ttl * 2)
end
return {0, 0}
"#;

/// Charges tokens to a tpm bucket. KEYS: tpm bucket. ARGV: tpm, tokens. The level may go below
/// zero (a long answer), capped at one hour's wait as in one process.
pub(crate) const CHARGE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'l', 'u')
local l, u = tonumber(v[1]), tonumber(v[2])
if l == nil or u == nil then l = tpm else l = math.min(tpm, l + math.max(0, now - u) * tpm / 60000) end
l = math.max(l - tokens, -60 * tpm)
redis.call('HSET', KEYS[1], 'l', l, 'u', now)
redis.call('PEXPIRE', KEYS[1], 3720000)
return 0
"#;

/// Gives back the request a refused request was charged. KEYS: rpm bucket. ARGV: rpm.
pub(crate) const REFUND: &str = r#"
local l = tonumber(redis.call('HGET', KEYS[1], 'l'))
if l ~= nil then redis.call('HSET', KEYS[1], 'l', math.min(tonumber(ARGV[1]), l + 1)) end
return 0
"#;

/// Renews a lease while its request lives. KEYS: leases. ARGV: lease id, ttl (ms). Returns 1
/// when renewed. A store that lost the team's leases (restarted empty) gets the lease back, so a
/// live stream keeps its place; a lease that is gone from a set that still exists (released, or
/// lapsed) is not brought back, and 0 is returned.
pub(crate) const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local had = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not had and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
if had then return 1 else return 0 end
"#;

/// Takes a slot on the first node with one free. KEYS: the nodes' lease sets, in order of
/// preference. ARGV: lease id, ttl (ms), then each node's `parallel`. Returns the 1-based index
/// of the node taken, 0 when every one is full.
pub(crate) const TAKE_SLOT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, ttl = ARGV[1], tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) < tonumber(ARGV[2 + i]) then
    redis.call('ZADD', key, now + ttl, lease)
    redis.call('PEXPIRE', key, ttl * 2)
    return i
  end
end
return 0
"#;
