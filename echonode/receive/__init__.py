"""Receiving: the DICOM Storage SCP, who may associate, and the spool files of data sets in transit."""
