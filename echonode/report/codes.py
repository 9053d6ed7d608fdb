"""The concepts an echonode report uses, and the codes of each task's finding.

Every code that pydicom's dictionaries hold (pydicom 3.0
:data:`pydicom.sr.codedict.codes` and its CID tables) is taken from them;
the few that are typed here say where they come from:

- SCT 55827005 "Left ventricular hypertrophy": *not* in pydicom's
  dictionaries; the meaning is SNOMED CT's preferred term (FSN "Left
  ventricular hypertrophy (disorder)").
- SCT 60573004 "Aortic stenosis": ``codes.SCT.AorticStenosis``, the meaning
  used by CID 12248 "Cardiac Ultrasound Summary Codes" (pydicom also lists the
  FSN "Aortic valve stenosis (disorder)", which is in no CID).
- SCT 87878005 "Left ventricle" (CID 3010, 12305 family) and SCT 34202007
  "Aortic Valve" (CID 12305 "Basic Echo Anatomic Site").
- SCT 52101004 "Present" and SCT 272519000 "Absent": CID 240
  "Present-Absent". (SCT 2667000 "Absent" is not the code DICOM uses.)
- SCT 246112005 "Severity (attribute)" and SCT 24484000 "Severe".
- DCM 122157 "Probability" (no CID; a generic concept, unlike DCM 111047
  "Probability of cancer"); unit UCUM "1" "no units".
- DCM 111031 "Image View"; DCM 121106 "Comment"; SCT 40701008
  "Echocardiography" as the procedure reported.
- UMLS C0034375 "Qualitative Evaluations": the TID 1500 container concept;
  not in pydicom's dictionaries, taken from TID 1500 row 10.
- Contributing equipment purpose: DCM 109102 "Processing Equipment" (CID 7005,
  pydicom) *and* IHE AIR's ("Newcode1", 99IHE, "Processing Algorithm"), the
  placeholder code the IHE AI Results profile assigns (DICOM has no
  "Processing Algorithm" code in CID 7005 as of pydicom 3.0's tables).
- Codes echonode defines itself use the private coding scheme designator
  :data:`ECHONODE_SCHEME`, declared in the report's Coding Scheme
  Identification Sequence together with :data:`IHE_SCHEME`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "COMMENT",
    "ECHONODE_SCHEME",
    "IHE_SCHEME",
    "IMAGE_VIEW",
    "LEFT_VENTRICULAR_HYPERTROPHY",
    "NO_USABLE_VIDEO",
    "NUMBER_OF_VIDEOS",
    "PROBABILITY",
    "PROBABILITY_UNIT",
    "PROCESSING_ALGORITHM",
    "QUALITATIVE_EVALUATIONS",
    "SUPERSEDES",
    "TASKS",
    "VIDEOS_UNIT",
    "VIDEO_PROBABILITY",
    "TaskCodes",
]

ECHONODE_SCHEME = "99ECHONODE"
IHE_SCHEME = "99IHE"

# echonode's own concepts (private coding scheme 99ECHONODE).
NUMBER_OF_VIDEOS = Code("EN0001", ECHONODE_SCHEME, "Number of videos used")
VIDEO_PROBABILITY = Code("EN0002", ECHONODE_SCHEME, "Video-level probability")
NO_USABLE_VIDEO = Code("EN0003", ECHONODE_SCHEME, "No usable video")
SUPERSEDES = Code("EN0004", ECHONODE_SCHEME, "Supersedes report")

# IHE AI Results (AIR): purpose of reference of the AI algorithm's equipment.
PROCESSING_ALGORITHM = Code("Newcode1", IHE_SCHEME, "Processing Algorithm")

# Not in pydicom's dictionaries; TID 1500 row 10 and SNOMED CT (see above).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
LEFT_VENTRICULAR_HYPERTROPHY = Code("55827005", "SCT", "Left ventricular hypertrophy")

PROBABILITY = codes.DCM.Probability
PROBABILITY_UNIT = codes.UCUM.NoUnits
VIDEOS_UNIT = Code("{videos}", "UCUM", "videos")
IMAGE_VIEW = codes.DCM.ImageView
COMMENT = codes.DCM.Comment


@dataclass(frozen=True)
class TaskCodes:
    """The codes that describe one task's finding.

    Attributes
    ----------
    finding : pydicom.sr.coding.Code
        The finding (TID 1501 "Finding").
    site : pydicom.sr.coding.Code
        Its finding site.
    severity : pydicom.sr.coding.Code or None
        A severity that modifies the finding and its evaluation (the task is
        about the *severe* form), when the task has one.
    """

    finding: Code
    site: Code
    severity: Code | None = None


#: Task name -> the codes that describe its finding.
TASKS: dict[str, TaskCodes] = {
    "lvh": TaskCodes(LEFT_VENTRICULAR_HYPERTROPHY, codes.SCT.LeftVentricle),
    "severe_as": TaskCodes(codes.SCT.AorticStenosis, codes.SCT.AorticValve, codes.SCT.Severe),
}
