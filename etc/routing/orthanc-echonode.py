"""Orthanc routing to echonode (Python plugin): every stable study that holds
ultrasound goes to echonode, which sends its SR back into the same study.

The same rule as ``orthanc-echonode.lua``, for sites that run Orthanc's
Python plugin (Debian: ``orthanc-python``) rather than Lua. In orthanc.json
(the modality's name must be the one below)::

    "Plugins": [ "/usr/share/orthanc/plugins/libOrthancPython.so" ],
    "PythonScript": "/etc/orthanc/echonode.py",
    "StableAge": 60,
    "DicomModalities": { "echonode": [ "ECHONODE", "10.20.0.9", 11112 ] }

and in echonode.toml a [[destinations]] entry naming this Orthanc (its
DicomAet, host and DicomPort), with Orthanc's AE title allowed to call.

A study is sent when Orthanc calls it stable (StableAge seconds with no new
instance) and one of its series has Modality US: that is ModalitiesInStudy
containing US. Every instance is sent (echo loops, and the sonographers'
measurement SRs, which echonode compares its results with), except:

* what echonode itself sent (its SRs): Orthanc records the calling AE title
  of every C-STORE (metadata RemoteAET); without this test, the SR coming
  back would make the study stable again and go back to echonode;
* what this script already sent while Orthanc runs: a study that gets one
  more loop later sends that loop only. (After a restart of Orthanc a study
  that changes is sent whole; echonode acknowledges the copies it already
  holds and drops them.)

Sending is an Orthanc job ("Asynchronous"): one association per study, and a
failure (echonode down) shows in Orthanc's job list, where it can be
resubmitted (POST /jobs/{id}/resubmit).
"""

import json
import threading
from collections import OrderedDict

import orthanc

MODALITY = "echonode"
#: Instance IDs remembered as sent, at most; the oldest are forgotten first.
MAX_REMEMBERED = 200000

_sent = OrderedDict()
_lock = threading.Lock()


def _get(uri):
    return json.loads(orthanc.RestApiGet(uri))


def _echonode_aet():
    modality = _get("/modalities?expand").get(MODALITY)
    return None if modality is None else modality["AET"]


def forward_if_ultrasound(study_id):
    """Send the study's instances not yet sent, and not sent by echonode, when it holds a US series."""
    series = _get(f"/studies/{study_id}/series")
    if not any(s["MainDicomTags"].get("Modality") == "US" for s in series):
        return
    aet = _echonode_aet()
    if aet is None:
        orthanc.LogWarning(f'echonode routing: no modality "{MODALITY}" in DicomModalities; study {study_id} not sent')
        return
    with _lock:
        candidates = [i for s in series for i in s["Instances"] if i not in _sent]
    resources = [i for i in candidates if _get(f"/instances/{i}/metadata?expand").get("RemoteAET") != aet]
    if not resources:
        return
    job = json.loads(orthanc.RestApiPost(f"/modalities/{MODALITY}/store",
                                         json.dumps({"Resources": resources, "Asynchronous": True})))
    with _lock:
        for instance_id in resources:
            _sent[instance_id] = True
        while len(_sent) > MAX_REMEMBERED:
            _sent.popitem(last=False)
    orthanc.LogWarning(f"echonode routing: study {study_id}: {len(resources)} instance(s) to {MODALITY} "
                       f"(job {job['ID']})")


def on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        try:
            forward_if_ultrasound(resource_id)
        except Exception as exc:  # noqa: BLE001 - an error here must not stop Orthanc's change callbacks
            orthanc.LogError(f"echonode routing: study {resource_id} not sent: {exc}")


orthanc.RegisterOnChangeCallback(on_change)
