"""A trained Adaptor for new images and reports: load, encode, compare, classify, retrieve, export.

    from pipeline.api import load_adaptor

    model = load_adaptor("runs/mine")                    # a run folder, a checkpoint, or a `pipe export` package
    img = model.encode_images(["a.png", "b.dcm"])        # through the frozen image encoder and the Adaptor
    txt = model.encode_texts(["Small left pleural effusion."])
    model.similarity(img, txt)                           # cosine similarities
    model.zero_shot(img).frame()                         # findings from configs/prompts/chest_xray.yaml
    model.report_bank("demo", split="train").search(img, k=3)

Preprocessing and arithmetic are stage one's (:mod:`pipeline.encoders.stored`), so an image
encoded here equals its cached row through the same Adaptor, to float16 rounding.
"""
from pipeline.api.bank import Hit, ReportBank
from pipeline.api.encode import ImageInput
from pipeline.api.export import ExportResult, export_adaptor
from pipeline.api.model import HeadOutput, ImageInputError, TrainedAdaptor, ZeroShot, load_adaptor
from pipeline.api.predict import Predictions, predict
from pipeline.api.source import EncoderMismatchError

__all__ = ["EncoderMismatchError", "ExportResult", "HeadOutput", "Hit", "ImageInput", "ImageInputError",
           "Predictions", "ReportBank", "TrainedAdaptor", "ZeroShot", "export_adaptor", "load_adaptor", "predict"]
