"""The Orthanc routing recipes of ``etc/routing/``, run for real.

Orthanc starts with the recipe (the Lua script, or the Python-plugin script
with Debian's ``orthanc-python``), ``StableAge`` 1 s and echonode as the
modality "echonode"; echonode's destination is that Orthanc. A study is
stored into Orthanc over REST as a cart's images would be; nothing else is
asked of Orthanc: its own routing must send the study to echonode, the SR
must come back into the same study, and the SR's arrival (which makes the
study stable again) must not send anything back to echonode. A study without
ultrasound is not sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from echonode.daemon.node import Node
from echonode.studies.states import StudyState
from tests.conftest import REPO, free_port, make_config, wait_for, with_destination
from tests.factories import tiny_bundle, us_multiframe, write
from tests.peers import ORTHANC, ORTHANC_PYTHON, Orthanc, require_tool

LUA_RECIPE = REPO / "etc" / "routing" / "orthanc-echonode.lua"
PYTHON_RECIPE = REPO / "etc" / "routing" / "orthanc-echonode.py"


class RoutingOrthanc(Orthanc):
    """An Orthanc that routes to echonode by a recipe of ``etc/routing/`` (``lua`` or ``python``)."""

    def __init__(self, root: Path, node_port: int, recipe: str) -> None:
        super().__init__(root, node_port)
        config = json.loads(self.config.read_text())
        config["StableAge"] = 1
        if recipe == "lua":
            config["LuaScripts"] = [str(LUA_RECIPE)]
        else:
            config["Plugins"] = [require_tool(ORTHANC_PYTHON)]
            config["PythonScript"] = str(PYTHON_RECIPE)
        self.config.write_text(json.dumps(config, indent=2))

    def stable_events(self, study_id: str) -> int:
        """How many times Orthanc has called the study stable."""
        changes = self.get("/changes?limit=1000")["Changes"]
        return sum(1 for c in changes if c["ChangeType"] == "StableStudy" and c["ID"] == study_id)

    def store_jobs(self) -> list[dict[str, Any]]:
        """Orthanc's jobs that C-STOREd to the modality "echonode"."""
        jobs = self.get("/jobs?expand")
        return [j for j in jobs if j["Type"] == "DicomModalityStore"
                and j.get("Content", {}).get("RemoteAet") == "ECHONODE"]


@pytest.fixture
def routed(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Node, RoutingOrthanc]]:
    """A node (with its worker) and an Orthanc that routes to it by ``request.param``'s recipe."""
    require_tool(ORTHANC)
    node_port = free_port()
    orthanc = RoutingOrthanc(tmp_path / "orthanc", node_port, request.param)
    cfg = make_config(
        tmp_path,
        # Only Orthanc calls: the study can reach the node by Orthanc's routing alone.
        node={"port": node_port, "allowed_calling_aets": ["ORTHANC"]},
        study={"stable_after_s": 0.5, "check_interval_s": 0.2},
        delivery={"retry_initial_s": 0.5, "retry_max_s": 1.0, "check_interval_s": 0.2, "timeout_s": 10.0},
    )
    cfg = with_destination(cfg, "orthanc", "ORTHANC", orthanc.dicom_port)
    tiny_bundle(cfg.models_dir, "lvh", seed=1)
    tiny_bundle(cfg.models_dir, "severe_as", seed=2)
    node = Node(cfg)
    node.start()
    try:
        orthanc.start()
        yield node, orthanc
    finally:
        orthanc.stop()
        node.stop()


@pytest.mark.parametrize("routed", ["lua", "python"], indirect=True)
def test_orthanc_routes_an_echo_study_to_echonode_and_files_the_sr(routed: tuple[Node, RoutingOrthanc],
                                                                   ybr_loop: Path, tmp_path: Path) -> None:
    node, orthanc = routed
    src = pydicom.dcmread(ybr_loop, stop_before_pixels=True)
    assert src.Modality == "US"
    study_uid = str(src.StudyInstanceUID)
    # A study without ultrasound, stored first: the recipe must leave it alone.
    ct = us_multiframe(frames=2, rows=16, cols=16)
    ct.Modality = "CT"
    ct_study = orthanc.upload(write(ct, tmp_path / "ct.dcm"))["ParentStudy"]

    study_id = orthanc.upload(ybr_loop)["ParentStudy"]

    def sr_in_orthanc() -> list[str]:
        node.worker.supervise()
        return orthanc.sr_instances(study_id)

    (sr_id,) = wait_for(sr_in_orthanc, timeout=90, what="the SR in Orthanc's study, by Orthanc's own routing")
    wait_for(lambda: node.journal.study_state(study_uid) == StudyState.DELIVERED, timeout=10,
             what="the study delivered")
    (instance,) = node.journal.instances(study_uid)
    assert instance.calling_ae == "ORTHANC" and instance.sop_uid == str(src.SOPInstanceUID)
    sr = orthanc.get(f"/instances/{sr_id}/simplified-tags")
    assert sr["StudyInstanceUID"] == study_uid and sr["Modality"] == "SR"
    assert sr["SOPInstanceUID"] == node.journal.latest_report(study_uid).sr_sop_uid
    # What the recipes key on to leave echonode's own objects alone.
    assert orthanc.request("GET", f"/instances/{sr_id}/metadata/RemoteAET") == b"ECHONODE"

    # The SR's arrival makes the study stable again; the recipe runs again and sends nothing.
    wait_for(lambda: orthanc.stable_events(study_id) >= 2, timeout=30, what="the study stable again after the SR")
    assert orthanc.stable_events(ct_study) >= 1
    jobs = orthanc.store_jobs()
    assert len(jobs) == 1, jobs
    assert jobs[0]["State"] == "Success" and jobs[0]["Content"]["InstancesCount"] == 1
    counters = node.scp.counters
    assert (counters.instances, counters.duplicates) == (1, 0)
    assert len(node.journal.instances(study_uid)) == 1  # the SR did not come back
    assert [s["study_uid"] for s in node.journal.status()["studies"]] == [study_uid]  # nor did the CT study
    (row,) = node.journal.status()["outbox"]
    assert (row["destination"], row["state"], row["attempts"]) == ("orthanc", "sent", 1)
    assert len(orthanc.sr_instances(study_id)) == 1


# -- dcm4chee-arc (no archive here to run it against: the two forms must agree) ----------------------


def _ldif_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """The LDIF's entries by objectClass, each attribute with its values."""
    entries: dict[str, dict[str, list[str]]] = {}
    for block in path.read_text().split("\n\n"):
        attrs: dict[str, list[str]] = {}
        for line in block.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition(": ")
                attrs.setdefault(key, []).append(value)
        if "objectClass" in attrs:
            entries[attrs["objectClass"][0]] = attrs
    return entries


def test_the_dcm4chee_recipe_says_the_same_in_ldif_and_json() -> None:
    ldif = _ldif_entries(REPO / "etc" / "routing" / "dcm4chee-arc-echonode.ldif")
    doc = json.loads((REPO / "etc" / "routing" / "dcm4chee-arc-echonode.json").read_text())
    (rule,) = doc["dcmArchiveDevice"]["dcmExportRule"]
    (exporter,) = doc["dcmArchiveDevice"]["dcmExporter"]
    # What makes it route echo studies, and only those, to echonode.
    assert rule["dcmEntity"] == "Study" and "Modality=US" in rule["dcmProperty"]
    assert "SendingApplicationEntityTitle!=ECHONODE" in rule["dcmProperty"]
    assert rule["dcmExporterID"] == [exporter["dcmExporterID"]] and exporter["dcmURI"] == "dicom:ECHONODE"
    assert doc["echonodeDevice"]["dicomNetworkAE"][0]["dicomAETitle"] == "ECHONODE"
    # The attributes dcm4chee-arc's configuration schema requires.
    assert {"cn", "dcmEntity", "dcmExporterID", "dcmExportPreviousEntity", "dcmExportReoccurredInstances"} <= set(rule)
    assert {"dcmExporterID", "dcmURI", "dcmQueueName", "dcmExportPriority", "dcmInstanceAvailability",
            "dicomAETitle", "dcmRejectForDataRetentionExpiry"} <= set(exporter)
    for json_form, ldif_form in ((rule, ldif["dcmExportRule"]), (exporter, ldif["dcmExporter"])):
        for key, value in json_form.items():
            values = value if isinstance(value, list) else [value]
            expected = [str(v).upper() if isinstance(v, bool) else str(v) for v in values]
            assert ldif_form[key] == expected, key
    connection = doc["echonodeDevice"]["dicomNetworkConnection"][0]
    assert ldif["dicomNetworkConnection"]["dicomHostname"] == [connection["dicomHostname"]]
    assert ldif["dicomNetworkConnection"]["dicomPort"] == [str(connection["dicomPort"])]
