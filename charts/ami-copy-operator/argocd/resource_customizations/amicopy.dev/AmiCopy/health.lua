-- Argo CD health check for amicopy.dev/AmiCopy.
--
-- Install it in argocd-cm under
--   resource.customizations.health.amicopy.dev_AmiCopy
-- (see the README). Argo CD runs it with gopher-lua (Lua 5.1), `obj` being
-- the live object.
--
--   Healthy      Ready=True for the current metadata.generation
--   Degraded     Degraded=True, with its message
--   Progressing  anything else: no status yet, a spec change not yet
--                observed, or copies pending (with the Progressing or Ready
--                message)

local hs = {}

local function condition(conditions, wanted)
  for _, c in ipairs(conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
if status == nil or status.conditions == nil or #status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for status"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local degraded = condition(status.conditions, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = message_of(degraded, "Degraded")
  return hs
end

local ready = condition(status.conditions, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(ready, "Every copy is available")
  return hs
end

local progressing = condition(status.conditions, "Progressing")
hs.status = "Progressing"
if progressing ~= nil and progressing.status == "True" then
  hs.message = message_of(progressing, "Copying")
else
  hs.message = message_of(ready, "Waiting for copies")
end
return hs
