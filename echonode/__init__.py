"""echonode: a DICOM node for echocardiography AI.

Receives echo cine loops over DICOM, classifies complete studies with
EchoCLR-based video models and returns the result as a TID 1500 Structured
Report in the same study.
"""

__version__ = "0.1.0"
