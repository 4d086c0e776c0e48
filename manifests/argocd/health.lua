-- Argo CD health check for prefect.io/PrefectAgent, PrefectWorkPool and PrefectDeployment.
-- Healthy: Ready=True for the current generation. Degraded: Degraded=True, with its
-- message. Suspended: spec.suspend. Progressing: no status yet, an older generation
-- observed, or the agent still starting (the pool or deployment not yet synced).
local hs = {status = "Progressing", message = "Waiting for the operator to report status"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata.generation
local function current(c)
  return generation == nil or c.observedGeneration == nil or c.observedGeneration >= generation
end
if generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local ready, degraded, progressing
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then ready = c
  elseif c.type == "Degraded" then degraded = c
  elseif c.type == "Progressing" then progressing = c
  end
end
if degraded ~= nil and degraded.status == "True" and current(degraded) then
  hs.status = "Degraded"
  hs.message = degraded.message or degraded.reason or "Degraded"
  return hs
end
if ready ~= nil and current(ready) then
  if ready.status == "True" then
    hs.status = "Healthy"
    hs.message = ready.message or "Ready"
    return hs
  end
  if ready.reason == "Suspended" then
    hs.status = "Suspended"
    hs.message = ready.message or "Suspended"
    return hs
  end
  hs.message = ready.message or hs.message
end
if progressing ~= nil and progressing.status == "True" and progressing.message ~= nil then
  hs.message = progressing.message
end
return hs
