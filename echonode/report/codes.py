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
- DCM 111031 "Image View", valued from CID 12226 "Echocardiography Image
  View" (``codes.cid12226``: SCT 399139001 "Parasternal long axis", SCT
  399214001 "Apical four chamber", ...) as the echo measurement templates
  (TID 5200) use it; DCM 121106 "Comment"; DCM 121071 "Finding" as the
  concept of a plain-language finding (TEXT, as in TID 2002 "Report
  Narrative"); SCT 40701008 "Echocardiography" as the procedure reported.
- SCT 373068000 "Undetermined": the third value of CID 240 "Present-Absent",
  the evaluation of a finding the models could not assess.
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
    "FINDING_TEXT",
    "IHE_SCHEME",
    "IMAGE_VIEW",
    "LEFT_VENTRICULAR_HYPERTROPHY",
    "NOT_ASSESSED_REASONS",
    "NO_MEASURABLE_VIDEO",
    "NO_REQUIRED_VIEW",
    "NO_USABLE_VIDEO",
    "NUMBER_OF_VIDEOS",
    "PROBABILITY",
    "PROBABILITY_UNIT",
    "PROCESSING_ALGORITHM",
    "QUALITATIVE_EVALUATIONS",
    "REASON_NOT_ASSESSED",
    "SUPERSEDES",
    "TASKS",
    "UNDETERMINED",
    "VIDEOS_UNIT",
    "VIDEO_PROBABILITY",
    "VIEWS",
    "TaskCodes",
    "ViewCode",
]

ECHONODE_SCHEME = "99ECHONODE"
IHE_SCHEME = "99IHE"

# echonode's own concepts (private coding scheme 99ECHONODE).
NUMBER_OF_VIDEOS = Code("EN0001", ECHONODE_SCHEME, "Number of videos used")
VIDEO_PROBABILITY = Code("EN0002", ECHONODE_SCHEME, "Video-level probability")
NO_USABLE_VIDEO = Code("EN0003", ECHONODE_SCHEME, "No usable video")
SUPERSEDES = Code("EN0004", ECHONODE_SCHEME, "Supersedes report")
REASON_NOT_ASSESSED = Code("EN0005", ECHONODE_SCHEME, "Reason not assessed")
NO_REQUIRED_VIEW = Code("EN0006", ECHONODE_SCHEME, "No video of the required view")
NO_MEASURABLE_VIDEO = Code("EN0007", ECHONODE_SCHEME, "No video the model could measure")

#: Why a task was not assessed -> the coded reason (the value of
#: :data:`REASON_NOT_ASSESSED`).
NOT_ASSESSED_REASONS: dict[str, Code] = {
    "no_usable_video": NO_USABLE_VIDEO,
    "no_required_view": NO_REQUIRED_VIEW,
    "no_measurable_video": NO_MEASURABLE_VIDEO,
}

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
FINDING_TEXT = codes.DCM.Finding
UNDETERMINED = codes.SCT.Undetermined


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


@dataclass(frozen=True)
class ViewCode:
    """How a view label of the view classifier is coded and said.

    Attributes
    ----------
    code : pydicom.sr.coding.Code
        The view, from CID 12226 "Echocardiography Image View".
    phrase : str
        The view as an adjective in a sentence ("parasternal long-axis").
    """

    code: Code
    phrase: str


_CID12226 = codes.cid12226

#: View label (as a view bundle's ``labels`` and ``models.views`` name it) ->
#: its code and phrase; one label per code, so that a report reads back to the
#: labels it was built from. A label not listed here is written as text.
VIEWS: dict[str, ViewCode] = {
    "plax": ViewCode(_CID12226.ParasternalLongAxis, "parasternal long-axis"),
    "psax": ViewCode(_CID12226.ParasternalShortAxis, "parasternal short-axis"),
    "psax_av": ViewCode(_CID12226.ParasternalShortAxisAtTheAorticValveLevel,
                        "parasternal short-axis (aortic valve level)"),
    "psax_mv": ViewCode(_CID12226.ParasternalShortAxisAtTheMitralValveLevel,
                        "parasternal short-axis (mitral valve level)"),
    "psax_pm": ViewCode(_CID12226.ParasternalShortAxisAtThePapillaryMuscleLevel,
                        "parasternal short-axis (papillary muscle level)"),
    "a4c": ViewCode(_CID12226.ApicalFourChamber, "apical four-chamber"),
    "a2c": ViewCode(_CID12226.ApicalTwoChamber, "apical two-chamber"),
    "a3c": ViewCode(_CID12226.ApicalLongAxis, "apical long-axis"),
}
