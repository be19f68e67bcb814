//! Remote ports of tunnels on Redis (`docs/redis-schema.md`): per proxy set a hash port → JSON
//! claim, a version counter moved by every change, and a hash of ports proxies could not bind.

use async_trait::async_trait;
use redis::AsyncCommands;

use super::RedisStore;
use crate::domain::SetName;
use crate::store::{
    PortClaim, PortOutcome, PortRegistry, PortRequest, PortTable, PortTraffic, StoreError,
};

/// Lua shared by [`CLAIM`] and [`RELEASE`]: `canon(v)` a text of `v` with its keys sorted (to
/// compare records); `members_without(rec, holder)` is a group record's
/// members other than `holder`'s; `forget(port)` drops what a port carried; `drop_member`
/// takes `holder` out of the group record at `port`, freeing the port with its last member.
const COMMON: &str = r"
local function canon(v)
  if type(v) ~= 'table' then return cjson.encode(v) end
  local keys = {}
  for k in pairs(v) do table.insert(keys, tostring(k)) end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local val = v[k]
    if val == nil then val = v[tonumber(k)] end
    table.insert(parts, k .. '=' .. canon(val))
  end
  return '{' .. table.concat(parts, ',') .. '}'
end
local function members_without(rec, holder)
  local out = {}
  if type(rec['members']) == 'table' then
    for _, m in ipairs(rec['members']) do
      if m['holder'] ~= holder then table.insert(out, m) end
    end
  end
  return out
end
local function forget(port)
  redis.call('HDEL', KEYS[3], port .. ':connections', port .. ':bytes_in', port .. ':bytes_out')
end
local function is_member(rec, holder)
  if type(rec['members']) ~= 'table' then return false end
  for _, m in ipairs(rec['members']) do
    if m['holder'] == holder then return true end
  end
  return false
end
local function drop_member(port, rec, holder)
  local rest = members_without(rec, holder)
  if #rest == 0 then
    redis.call('HDEL', KEYS[1], tostring(port))
    forget(port)
  else
    rec['members'] = rest
    redis.call('HSET', KEYS[1], tostring(port), cjson.encode(rec))
  end
end
";

/// KEYS: the set's table, its version, its traffic. ARGV: holder, lowest and highest automatic
/// port, and a JSON array of `{port, name, record, group?}` (`port` 0: automatic). Explicit
/// requests first, then automatic ones (the port the holder already has under that name, else
/// the lowest free one); then the holder's ports no request names are freed. A request with a
/// `group` joins the group's record at its port (free, or held by the same group): the record's
/// holder is `group:<group>` and `members` lists each TunnelSet's tunnel; leaving takes the
/// member out, and the last one frees the port. Returns per request `held:<port>`,
/// `conflict:<port>:<holder>` or `exhausted`; moves the version when anything changed.
const CLAIM: &str = r"
local holder = ARGV[1]
local lo, hi = tonumber(ARGV[2]), tonumber(ARGV[3])
local reqs = cjson.decode(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
local taken, mine = {}, {}
for i = 1, #all, 2 do
  local ok, rec = pcall(cjson.decode, all[i + 1])
  local port = tonumber(all[i])
  if port then
    if ok and type(rec) == 'table' then
      taken[port] = rec
      if rec['holder'] == holder then mine[rec['name']] = port end
    else
      taken[port] = {holder = '?'}
    end
  end
end
local out, keep, changed = {}, {}, false
for pass = 1, 2 do
  for i, r in ipairs(reqs) do
    local explicit = r['port'] ~= 0
    if (pass == 1) == explicit then
      local port = r['port']
      if not explicit then
        port = mine[r['name']]
        if port and keep[port] then port = nil end
        if port == nil then
          for p = lo, hi do
            if taken[p] == nil and not keep[p] then port = p; break end
          end
        end
      end
      if port == nil then
        out[i] = 'exhausted'
      else
        local cur = taken[port]
        local group = r['group']
        if group then
          local gholder = 'group:' .. group
          local mine = r['record'] and cjson.decode(r['record'])
          local ours = cur and cur['holder'] == gholder
          -- The holder's own ungrouped claim on this port becomes the group's.
          local own = cur and cur['holder'] == holder
          -- A group lives in one set: its port moves to the DR set as one.
          if keep[port] or (cur and not ours and not own)
            or (ours and (cur['udp'] == true) ~= (mine['udp'] == true))
            or (ours and cur['set'] ~= mine['set']) then
            out[i] = 'conflict:' .. port .. ':' .. ((cur and cur['holder']) or holder)
          else
            local members = {}
            if ours then members = members_without(cur, holder) end
            table.insert(members, {holder = holder, client_id = mine['client_id'], name = mine['name'], target = mine['target']})
            table.sort(members, function(a, b) return a['holder'] < b['holder'] end)
            -- The group's settings are its first member's (in holder order): the others copy
            -- them, so every member's reconcile writes the same record.
            local base = mine
            if ours and members[1]['holder'] ~= holder then base = cur end
            local rec = {
              holder = gholder, group = group, client_id = '', name = group, target = '',
              set = mine['set'],
              udp = base['udp'], max_connections = base['max_connections'],
              max_bytes_per_second = base['max_bytes_per_second'], udp_idle_ms = base['udp_idle_ms'],
              balance = base['balance'], health_check = base['health_check'], members = members,
            }
            keep[port] = true
            -- cjson's key order is not stable: compare the records, not their text.
            if cur == nil or canon(cur) ~= canon(rec) then
              if cur == nil then forget(port) end
              redis.call('HSET', KEYS[1], tostring(port), cjson.encode(rec))
              changed = true
            end
            taken[port] = rec
            out[i] = 'held:' .. port
          end
        elseif keep[port] or (cur and cur['holder'] ~= holder
            and not (cur['holder'] == 'group:' .. tostring(cur['group'])
              and #members_without(cur, holder) == 0)) then
          out[i] = 'conflict:' .. port .. ':' .. ((cur and cur['holder']) or holder)
        else
          keep[port] = true
          if redis.call('HGET', KEYS[1], tostring(port)) ~= r['record'] then
            if cur == nil then forget(port) end
            redis.call('HSET', KEYS[1], tostring(port), r['record'])
            changed = true
          end
          out[i] = 'held:' .. port
        end
      end
    end
  end
end
for port, rec in pairs(taken) do
  if not keep[port] then
    if rec['holder'] == holder then
      redis.call('HDEL', KEYS[1], tostring(port))
      forget(port)
      changed = true
    elseif is_member(rec, holder) then
      drop_member(port, rec, holder)
      changed = true
    end
  end
end
if changed then redis.call('INCR', KEYS[2]) end
return out
";

/// KEYS: the set's table, its version, its traffic. ARGV: holder. Frees its ports (and
/// forgets what they carried) and leaves the groups it is a member of.
const RELEASE: &str = r"
local all = redis.call('HGETALL', KEYS[1])
local changed = false
for i = 1, #all, 2 do
  local ok, rec = pcall(cjson.decode, all[i + 1])
  if ok and type(rec) == 'table' then
    if rec['holder'] == ARGV[1] then
      redis.call('HDEL', KEYS[1], all[i])
      forget(all[i])
      changed = true
    elseif is_member(rec, ARGV[1]) then
      drop_member(all[i], rec, ARGV[1])
      changed = true
    end
  end
end
if changed then redis.call('INCR', KEYS[2]) end
return 0
";

/// How long a bind error stays unless re-reported.
const ERROR_TTL_SECS: i64 = 600;

fn parse_outcome(s: &str) -> PortOutcome {
    let port = |p: &str| p.parse::<u16>().unwrap_or(0);
    if let Some(p) = s.strip_prefix("held:") {
        return PortOutcome::Held(port(p));
    }
    if let Some(rest) = s.strip_prefix("conflict:") {
        let (p, holder) = rest.split_once(':').unwrap_or((rest, "?"));
        return PortOutcome::Conflict {
            port: port(p),
            holder: holder.to_string(),
        };
    }
    PortOutcome::Exhausted
}

#[async_trait]
impl PortRegistry for RedisStore {
    async fn claim_ports(
        &self,
        set: &SetName,
        holder: &str,
        requests: &[PortRequest],
        range: (u16, u16),
    ) -> Result<Vec<PortOutcome>, StoreError> {
        let keys = &self.inner.keys;
        let mut reqs = Vec::with_capacity(requests.len());
        for r in requests {
            let record = serde_json::to_string(&r.claim).map_err(|e| StoreError::Corrupt {
                at: keys.ports(set),
                detail: e.to_string(),
            })?;
            let mut req =
                serde_json::json!({"port": r.port, "name": r.claim.name, "record": record});
            if let Some(g) = &r.claim.group {
                req["group"] = serde_json::Value::String(g.clone());
            }
            reqs.push(req);
        }
        let out: Vec<String> = redis::Script::new(&format!("{COMMON}{CLAIM}"))
            .key(keys.ports(set))
            .key(keys.ports_version(set))
            .key(keys.port_traffic(set))
            .arg(holder)
            .arg(range.0)
            .arg(range.1)
            .arg(serde_json::Value::Array(reqs).to_string())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(out.iter().map(|s| parse_outcome(s)).collect())
    }

    async fn release_ports(&self, set: &SetName, holder: &str) -> Result<(), StoreError> {
        let keys = &self.inner.keys;
        let _: i64 = redis::Script::new(&format!("{COMMON}{RELEASE}"))
            .key(keys.ports(set))
            .key(keys.ports_version(set))
            .key(keys.port_traffic(set))
            .arg(holder)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn port_version(&self, set: &SetName) -> Result<u64, StoreError> {
        let v: Option<u64> = self.conn().get(self.inner.keys.ports_version(set)).await?;
        Ok(v.unwrap_or(0))
    }

    async fn port_table(&self, set: &SetName) -> Result<PortTable, StoreError> {
        let keys = &self.inner.keys;
        // The version first: a change after it is read moves it again, so nothing is missed.
        let version = self.port_version(set).await?;
        let raw: std::collections::BTreeMap<String, String> =
            self.conn().hgetall(keys.ports(set)).await?;
        let mut ports = Vec::with_capacity(raw.len());
        for (field, value) in raw {
            let port = field.parse::<u16>().ok().filter(|p| *p > 0);
            match (port, serde_json::from_str::<PortClaim>(&value)) {
                (Some(p), Ok(c)) => ports.push((p, c)),
                _ => {
                    tracing::warn!(key = %keys.ports(set), %field, "unreadable port claim skipped")
                }
            }
        }
        Ok(PortTable { version, ports })
    }

    async fn report_port(
        &self,
        set: &SetName,
        port: u16,
        node_id: &str,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let key = self.inner.keys.port_errors(set);
        let field = format!("{port}/{node_id}");
        let mut conn = self.conn();
        match error {
            Some(e) => {
                let () = redis::pipe()
                    .atomic()
                    .hset(&key, &field, e)
                    .ignore()
                    .expire(&key, ERROR_TTL_SECS)
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
            }
            None => {
                let _: i64 = conn.hdel(&key, &field).await?;
            }
        }
        Ok(())
    }

    async fn add_port_traffic(
        &self,
        set: &SetName,
        port: u16,
        traffic: PortTraffic,
    ) -> Result<(), StoreError> {
        let key = self.inner.keys.port_traffic(set);
        let field = |what: &str| format!("{port}:{what}");
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let () = redis::pipe()
            .hincr(&key, field("connections"), as_i64(traffic.connections))
            .ignore()
            .hincr(&key, field("bytes_in"), as_i64(traffic.bytes_in))
            .ignore()
            .hincr(&key, field("bytes_out"), as_i64(traffic.bytes_out))
            .ignore()
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn port_traffic(
        &self,
        set: &SetName,
    ) -> Result<std::collections::HashMap<u16, PortTraffic>, StoreError> {
        let raw: std::collections::HashMap<String, u64> = self
            .conn()
            .hgetall(self.inner.keys.port_traffic(set))
            .await?;
        let mut out: std::collections::HashMap<u16, PortTraffic> = Default::default();
        for (field, n) in raw {
            let Some((port, what)) = field.split_once(':') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            let t = out.entry(port).or_default();
            match what {
                "connections" => t.connections = n,
                "bytes_in" => t.bytes_in = n,
                "bytes_out" => t.bytes_out = n,
                _ => {}
            }
        }
        Ok(out)
    }

    async fn port_errors(&self, set: &SetName) -> Result<Vec<(u16, String)>, StoreError> {
        let raw: std::collections::BTreeMap<String, String> = self
            .conn()
            .hgetall(self.inner.keys.port_errors(set))
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|(field, why)| {
                let (port, node) = field.split_once('/')?;
                Some((port.parse().ok()?, format!("{node}: {why}")))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_scripts_answers() {
        assert_eq!(parse_outcome("held:2222"), PortOutcome::Held(2222));
        assert_eq!(
            parse_outcome("conflict:2222:k8s:c/ns/a"),
            PortOutcome::Conflict {
                port: 2222,
                holder: "k8s:c/ns/a".into()
            }
        );
        assert_eq!(parse_outcome("exhausted"), PortOutcome::Exhausted);
    }
}
