"""The model families a job can name: sizes, input, embedding size, encoder parameters, default recipes."""

from fastapi import APIRouter

from api.schemas import METHODS_EXAMPLE, MethodList
from services.models.methods import catalogue

router = APIRouter(tags=["methods"])


@router.get(
    "/methods",
    response_model=MethodList,
    summary="Model families and pretraining methods: sizes, input, parameters, default recipes",
    description=(
        "One entry per encoder family (the 'family' of POST /jobs/finetune) with its self-supervised "
        "pretraining method (the 'method' of POST /jobs/pretrain) and, per size ('model_size'): the input "
        "the encoder consumes, its embedding dimension, its parameter count, and the pretraining and "
        "fine-tuning recipes that jobs fill in for settings not given, each with its evidence."
    ),
    responses={200: {"content": {"application/json": {"example": METHODS_EXAMPLE}}}},
)
def list_methods() -> MethodList:
    return MethodList(families=catalogue())
