"""Workflows: what users run on top of the one engine (`inference.predictor.Predictor.stream`).

Each workflow is a sink (or a source and a sink) around the same pipeline: `sorting` copies
items into plane folders with a journal, `scan` smooths a recording's frames into a timeline
with the best frame of each plane, `checklist` and `audit` answer which standard views a
study holds (studies from files, DICOM headers and videos -> checklist.json, report.html
and a department summary). The DICOM network lives here too: a Storage SCP that classifies
what scanners send (`dicom_listen`), DICOMweb pull/push against a PACS (`dicomweb`) and the
results written back as DICOM SR and KOS documents (`dicom_results`). Workflows never decode
or classify by themselves.
"""
