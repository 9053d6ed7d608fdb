-- Orthanc routing to echonode (Lua): every stable study that holds ultrasound
-- goes to echonode, which sends its SR back into the same study.
--
-- In orthanc.json (the modality's name must be the one below):
--
--   "LuaScripts": [ "/etc/orthanc/echonode.lua" ],
--   "StableAge": 60,
--   "DicomModalities": { "echonode": [ "ECHONODE", "10.20.0.9", 11112 ] }
--
-- and in echonode.toml a [[destinations]] entry naming this Orthanc (its
-- DicomAet, host and DicomPort), with Orthanc's AE title allowed to call.
--
-- A study is sent when Orthanc calls it stable (StableAge seconds with no new
-- instance) and one of its series has Modality US: that is ModalitiesInStudy
-- containing US. Every instance is sent (echo loops, and the sonographers'
-- measurement SRs, which echonode compares its results with), except:
--   * what echonode itself sent (its SRs): Orthanc records the calling AE
--     title of every C-STORE (metadata RemoteAET); without this test, the SR
--     coming back would make the study stable again and go back to echonode;
--   * what this script already sent while Orthanc runs: a study that gets
--     one more loop later sends that loop only. (After a restart of Orthanc
--     a study that changes is sent whole; echonode acknowledges the copies it
--     already holds and drops them.)
-- Sending is an Orthanc job ("Asynchronous"): one association per study, and
-- a failure (echonode down) shows in Orthanc's job list, where it can be
-- resubmitted (POST /jobs/{id}/resubmit).

local MODALITY = 'echonode'
-- Instance IDs remembered as sent, at most; the oldest are forgotten first.
local MAX_REMEMBERED = 200000

local sent = {}
local sentOrder = {}
local oldest, newest = 1, 0

local function remember(instanceId)
   newest = newest + 1
   sentOrder[newest] = instanceId
   sent[instanceId] = true
   while newest - oldest + 1 > MAX_REMEMBERED do
      sent[sentOrder[oldest]] = nil
      sentOrder[oldest] = nil
      oldest = oldest + 1
   end
end

local function echonodeAet()
   local modalities = ParseJson(RestApiGet('/modalities?expand'))
   local modality = modalities[MODALITY]
   if modality == nil then
      return nil
   end
   return modality['AET']
end

function OnStableStudy(studyId, tags, metadata)
   local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
   local ultrasound = false
   for _, s in ipairs(series) do
      if s['MainDicomTags']['Modality'] == 'US' then
         ultrasound = true
      end
   end
   if not ultrasound then
      return
   end

   local aet = echonodeAet()
   if aet == nil then
      print('echonode routing: no modality "' .. MODALITY .. '" in DicomModalities; study ' .. studyId .. ' not sent')
      return
   end

   local resources = {}
   for _, s in ipairs(series) do
      for _, instanceId in ipairs(s['Instances']) do
         if not sent[instanceId] then
            local meta = ParseJson(RestApiGet('/instances/' .. instanceId .. '/metadata?expand'))
            if meta['RemoteAET'] ~= aet then
               table.insert(resources, instanceId)
            end
         end
      end
   end
   if #resources == 0 then
      return
   end

   local job = ParseJson(RestApiPost('/modalities/' .. MODALITY .. '/store',
                                     DumpJson({ Resources = resources, Asynchronous = true }, true)))
   for _, instanceId in ipairs(resources) do
      remember(instanceId)
   end
   print('echonode routing: study ' .. studyId .. ': ' .. #resources .. ' instance(s) to ' .. MODALITY
         .. ' (job ' .. job['ID'] .. ')')
end
