-- nexus-authz usage tap: an Envoy HTTP Lua filter (response path) for token accounting.
--
-- Placed after ext_authz, it reads the upstream's response body as it streams by (bodyChunks: Envoy
-- does not buffer, the client's timing is unchanged; only a plain body of known length up to SMALL
-- bytes, a JSON completion, is read whole with body()) and leaves in the dynamic metadata namespace
-- `nexus.usage` the few bytes nexus-authz needs to account the response. Envoy's gRPC access log
-- (envoy.access_loggers.http_grpc) then ships that metadata to nexus-authz in batches, where the core
-- usage parser (nexus_authz/core/usage.py) turns it into tokens: all usage semantics live there, this
-- script only selects bytes, with plain string.find and no JSON parsing.
--
-- What it keeps (each value base64, so that arbitrary bytes survive protobuf's UTF-8 string fields):
--   u = {k = "sse",  b = ...}  the complete SSE events that carry a usage object (OpenAI's usage chunk,
--                              Anthropic's message_start and every message_delta, Responses'
--                              response.completed), when one of them is a final record; or, for a
--                              stream over the cap without one, the head and tail of the stream
--   u = {k = "body", b = ...}  the whole body, as received (JSON documents, streams that never sent a
--                              usage record, compressed bodies: nexus decodes gzip/deflate itself)
--   u = {k = "tail", b = ...}  the last TAIL bytes of an uncompressed non-SSE body over the cap
--   u = {k = "over"}           a compressed body over the cap: nothing readable (nexus keeps the estimate)
--   u.x                         body bytes dropped unseen (over the cap), for nexus to extrapolate
--   p1, p2, ...                streams (SSE or compressed) only: the chunks so far, one key each,
--                              written as they pass, because a stream cut off (upstream reset, client
--                              gone) never resumes this coroutine; nulled when the stream ends normally
--                              (a metadata merge replaces a key's whole value, so one growing value
--                              would cost quadratic copying; and it cannot delete a key)
--   x                          bytes seen beyond the head of a stream over the cap (cut-off case)
--
-- Bounds: at most MAX_KEEP bytes of a body are kept (in Lua, and for streams also in the metadata
-- until the end), so the worst case is ~2.4 MiB of Envoy memory per concurrent response.
-- Compressed bodies: the script cannot decompress; it passes them raw (up to the cap) and nexus-authz
-- decodes them with the same parser the ext_proc path uses. Upstreams are not asked to stop
-- compressing: the client keeps what it negotiated.

local NS = "nexus.usage"
local MAX_KEEP = 1048576 -- body bytes kept for nexus-authz
local TAIL = 65536 -- over the cap, the last bytes kept: usage records sit at the end
local HEAD = MAX_KEEP - TAIL
local SMALL = 65536 -- a plain body of known length up to this size is read whole (body(), below)

local find, sub, gsub, lower, match = string.find, string.sub, string.gsub, string.lower, string.match
local concat = table.concat

-- Events whose usage object is a final record (usage.py reads it only there, at its place). Any other
-- named event (Responses' response.created echoes the request's tools, which may hold a client-chosen
-- `"usage": {...}`) is not; an event without a name (OpenAI chat/completions chunks) is, if it counts
-- tokens.
local FINAL = {
  ["response.completed"] = true,
  ["response.incomplete"] = true,
  ["response.failed"] = true,
  ["message_delta"] = true,
}

-- An event's name: its `event:` line, else the "type" its data starts with (as usage.py reads it).
local function event_name(event)
  local e = "\n" .. event
  return match(e, "\nevent:[ \t]*([^%s]+)") or match(e, '\ndata:[ \t]*{%s*"type"%s*:%s*"([^"\\]+)"')
end

-- Append to `out` the complete events of `s` that carry a usage object; return the new count and
-- whether one of them is a final record (not Anthropic's message_start, which only has input usage).
local function usage_events(s, out, n)
  local final = false
  local pos, len = 1, #s
  while true do
    local key = find(s, '"usage"', pos, true)
    if not key then
      break
    end
    local start = pos
    while true do -- the event holding `key` starts after the last blank line before it
      local q = find(s, "\n\n", start, true)
      if not q or q >= key then
        break
      end
      start = q + 2
    end
    local q = find(s, "\n\n", key, true)
    local stop = q and q + 1 or len
    local event = sub(s, start, stop)
    if find(event, '"usage"%s*:%s*{') then
      if not q then
        event = event .. "\n\n"
      end
      n = n + 1
      out[n] = event
      local name = event_name(event)
      if (name and FINAL[name]) or (not name and find(event, '_tokens"', 1, true)) then
        final = true
      end
    end
    pos = stop + 1
  end
  return n, final
end

local function lf(s)
  if find(s, "\r", 1, true) then
    s = gsub(s, "\r\n", "\n")
    s = gsub(s, "\r", "\n")
  end
  return s
end

-- What nexus-authz gets for a response that ended normally: kind, bytes (or nil), bytes skipped.
local function summary(head, tail, skipped, sse, encoded, over)
  if encoded then
    if over then
      return "over", nil, skipped
    end
    return "body", head, 0
  end
  if not sse then
    if over then
      return "tail", tail, skipped
    end
    return "body", head, 0
  end
  local out = {}
  local n, final = usage_events(lf(head), out, 0)
  local rest = ""
  if over then
    local t = lf(tail)
    local q = find(t, "\n\n", 1, true) -- the tail's first event is cut: drop it
    rest = q and sub(t, q + 2) or ""
    skipped = skipped + #t - #rest
    local found
    n, found = usage_events(rest, out, n)
    final = final or found
  end
  if final then
    return "sse", concat(out), skipped
  end
  if over then
    return "sse", head .. "\n\n" .. rest, skipped
  end
  return "body", head, 0
end

-- Early release of a concurrency slot. nexus-authz marks an admitted request that holds a `concurrent:`
-- slot of a window at least half full after its admission (`concurrent: 1` always) with its request id
-- in ext_authz's dynamic metadata (`x-nexus-release`: a response header of the HTTP service picked by
-- dynamic_metadata_from_headers, or CheckResponse.dynamic_metadata over gRPC). The access log settles
-- every request too, in batches up to buffer_flush_interval (0.02 s) after the client has the whole
-- response: that frees the other slots, and a request refused for a slot waits past one flush in
-- nexus-authz (decide.SLOT_WAIT) rather than meet a slot whose response has ended. For a key near its
-- limit, a call here, sent as the last body chunk passes and not waited for (asynchronous: the response
-- is not delayed), frees the slot about when the client sees the end of the response, so a client
-- sending one request at a time is not even delayed. Unmarked requests pay nothing.
local AUTHZ_NS = "envoy.filters.http.ext_authz"
local RELEASE_TIMEOUT_MS = 200

local function release_slot(handle)
  local authz = handle:streamInfo():dynamicMetadata():get(AUTHZ_NS)
  local id = authz and authz["x-nexus-release"]
  if not id or id == "" then
    return
  end
  if authz["key_id"] then -- gRPC ext_authz (its metadata has key_id): a unary call, framed here
    local n = #id
    local frame = string.char(0, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
      math.floor(n / 256) % 256, n % 256) .. id
    handle:httpCall("nexus_als", {
      [":method"] = "POST",
      [":path"] = "/nexus.authz.v1.Slots/Release",
      [":authority"] = "nexus-authz",
      ["content-type"] = "application/grpc",
      ["te"] = "trailers",
    }, frame, RELEASE_TIMEOUT_MS, true)
  else -- HTTP ext_authz: the same Unix socket, an HTTP/1.1 keep-alive connection
    handle:httpCall("nexus_authz", {
      [":method"] = "POST",
      [":path"] = "/_nexus/release",
      [":authority"] = "nexus-authz",
      ["x-nexus-release"] = "1",
    }, id, RELEASE_TIMEOUT_MS, true)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local ctype = lower(headers:get("content-type") or "")
  local encoding = lower(headers:get("content-encoding") or "")
  local encoded = encoding ~= "" and encoding ~= "identity"
  local sse = find(ctype, "event-stream", 1, true) ~= nil
  local checkpoint = sse or encoded
  local length = tonumber(headers:get("content-length") or "")
  if length and length <= SMALL and not checkpoint then
    -- The common case, a JSON completion: a small plain body of known length, kept whole. body()
    -- resumes this script once, with the whole body, instead of once per chunk and without the chunk
    -- bookkeeping below (measured: a sixth of what the tap costs Envoy per request); Envoy holds at
    -- most SMALL bytes, which the client of a JSON body reads whole anyway. The slot is released
    -- before the body goes on, as on the last chunk below.
    local body = handle:body()
    release_slot(handle)
    local data = body and body:getBytes(0, body:length()) or ""
    handle:streamInfo():dynamicMetadata():set(NS, "u", { k = "body", b = handle:base64Escape(data) })
    return
  end
  local head, nhead, hbytes = {}, 0, 0
  local tail, t0, t1, tbytes = {}, 1, 0, 0
  local skipped, over = 0, false
  -- With a content-length the client has the whole response with the last body byte (the end of
  -- stream may follow as an empty chunk): release on that chunk, which Envoy holds until the call
  -- returns. Otherwise (chunked, HTTP/2, no body) release at the end of stream, below.
  local seen, released = 0, false
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    if length and not released then
      seen = seen + size
      if seen >= length then
        released = true
        release_slot(handle)
      end
    end
    if size > 0 then
      local data = chunk:getBytes(0, size)
      if not over and hbytes + size <= HEAD then
        nhead = nhead + 1
        head[nhead] = data
        hbytes = hbytes + size
        if checkpoint then
          handle:streamInfo():dynamicMetadata():set(NS, "p" .. nhead, handle:base64Escape(data))
        end
      else
        over = true
        t1 = t1 + 1
        tail[t1] = data
        tbytes = tbytes + size
        while t1 > t0 and tbytes - #tail[t0] >= TAIL do
          skipped = skipped + #tail[t0]
          tbytes = tbytes - #tail[t0]
          tail[t0] = nil
          t0 = t0 + 1
        end
        if checkpoint then
          handle:streamInfo():dynamicMetadata():set(NS, "x", skipped + tbytes)
        end
      end
    end
  end
  -- The response ended normally (a reset never gets here: nexus-authz then reads `p`, and the access
  -- log releases the slot). Free the slot first: Envoy holds the last chunk until this returns.
  if not released then
    release_slot(handle)
  end
  local tailtext = ""
  if over then
    tailtext = concat(tail, "", t0, t1)
    if #tailtext > TAIL then
      skipped = skipped + #tailtext - TAIL
      tailtext = sub(tailtext, -TAIL)
    end
  end
  local kind, data, dropped = summary(concat(head), tailtext, skipped, sse, encoded, over)
  local meta = handle:streamInfo():dynamicMetadata()
  local record = { k = kind }
  if data then
    record.b = handle:base64Escape(data)
  end
  if dropped > 0 then
    record.x = dropped
  end
  meta:set(NS, "u", record)
  if checkpoint then
    for i = 1, nhead do -- a merge cannot delete a key: null the checkpoints, so they are not shipped
      meta:set(NS, "p" .. i, nil)
    end
  end
end
