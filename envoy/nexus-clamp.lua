-- nexus-authz clamp: an Envoy HTTP Lua filter (request path) that lowers the completion cap of a request
-- nexus-authz clamped (nexus_authz/core/clamp.py).
--
-- It runs only for such requests: envoy.yaml wraps it in an ExtensionWithMatcher that skips the filter
-- unless ext_authz's dynamic metadata holds `x-nexus-clamp`, so every other request pays one match in
-- C++ and no Lua coroutine. The response side (token usage, early slot release) is the usage tap.

local AUTHZ_NS = "envoy.filters.http.ext_authz"
local sub, match = string.sub, string.match
local concat = table.concat

-- nexus-authz admitted a request on a budget that only a shorter completion fits, with its completion
-- cap lowered: ext_authz's dynamic metadata holds `x-nexus-clamp` = "<body length>;<offset>:<count>:<text>;..." (byte splices of the body nexus read,
-- offsets 0-based and ascending). The body is buffered (only for such requests; ext_authz had already
-- buffered it whole: nexus never clamps a cut body), spliced and its content-length set. A body that is
-- not the one nexus read (another length, splices out of order) is refused here with 503: the request
-- never reaches the upstream with its original cap. Every other request skips this filter (above).
local CLAMP_KEY = "x-nexus-clamp"
local CLAMP_FAILED = '{"error":{"message":"The gateway could not apply the completion cap.",'
  .. '"type":"server_error","param":null,"code":"clamp_failed"}}'

local function clamp_failed(handle)
  handle:respond({ [":status"] = "503", ["content-type"] = "application/json", ["retry-after"] = "1" },
    CLAMP_FAILED)
end

function envoy_on_request(handle)
  local authz = handle:streamInfo():dynamicMetadata():get(AUTHZ_NS)
  local plan = authz and authz[CLAMP_KEY]
  if not plan then
    return
  end
  local length, splices = match(plan, "^(%d+);(.+)$")
  local body = handle:body()
  local size = body and body:length() or 0
  if not length or tonumber(length) ~= size then
    return clamp_failed(handle)
  end
  local data = body:getBytes(0, size)
  local out, n, pos = {}, 0, 0 -- pos: bytes of `data` already copied
  for off, count, text in string.gmatch(splices, "(%d+):(%d+):([^;]*)") do
    off, count = tonumber(off), tonumber(count)
    if off < pos or off + count > size then
      return clamp_failed(handle)
    end
    out[n + 1] = sub(data, pos + 1, off)
    out[n + 2] = text
    n = n + 2
    pos = off + count
  end
  if n == 0 then
    return clamp_failed(handle)
  end
  out[n + 1] = sub(data, pos + 1)
  local new = concat(out)
  body:setBytes(new)
  local headers = handle:headers()
  if headers:get("content-length") then
    headers:replace("content-length", tostring(#new))
  end
end
