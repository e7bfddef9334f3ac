"""Deployment: a trained run leaves medtransfer as TorchScript, ONNX or a MONAI bundle (:mod:`.export`), and its
predictions go back to the hospital's PACS as DICOM (:mod:`.dicom`: Structured Report, heat-map Secondary
Capture, Encapsulated PDF result sheet)."""
