"""The sonographers' echo measurement SRs, read into typed values and labels.

Carts send their measurements to the PACS beside the cine loops as a DICOM
SR: TID 5200 "Adult Echocardiography Procedure Report" or the simplified
TID 5300. This package reads them (no torch, no training code: the node and
``echonode-train`` both use it):

* :mod:`~echonode.measurements.concepts`: the concepts read and the codes
  that mean them (from :data:`pydicom.sr.codedict.codes`);
* :mod:`~echonode.measurements.units`: UCUM units to cm, m/s, mmHg, cm2, g, g/m2;
* :mod:`~echonode.measurements.reading`: an SR file to a
  :class:`MeasurementDocument` of :class:`Measurement` items;
* :mod:`~echonode.measurements.selection`: one value per concept, one SR per study;
* :mod:`~echonode.measurements.rules`: LVH and severe-AS labels, rules in TOML;
* :mod:`~echonode.measurements.reference`: all of it for one study.
"""

from echonode.measurements.concepts import CONCEPTS, CONCEPTS_BY_KEY, Concept
from echonode.measurements.reading import (
    Coded,
    Measurement,
    MeasurementDocument,
    is_sr_sop_class,
    read_measurement_sr,
)
from echonode.measurements.reference import NO_REPORT, StudyReference, study_reference
from echonode.measurements.rules import (
    TASKS,
    LabelDecision,
    Rules,
    RulesError,
    decide_labels,
    load_rules,
    parse_rules,
)
from echonode.measurements.selection import (
    DEFAULT_TOLERANCE,
    Selection,
    current_document,
    select_values,
)

__all__ = [
    "CONCEPTS",
    "CONCEPTS_BY_KEY",
    "DEFAULT_TOLERANCE",
    "NO_REPORT",
    "TASKS",
    "Coded",
    "Concept",
    "LabelDecision",
    "Measurement",
    "MeasurementDocument",
    "Rules",
    "RulesError",
    "Selection",
    "StudyReference",
    "current_document",
    "decide_labels",
    "is_sr_sop_class",
    "load_rules",
    "parse_rules",
    "read_measurement_sr",
    "select_values",
    "study_reference",
]
