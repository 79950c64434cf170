"""Shared machinery of the CoMat training scripts and pipeline: one module per concept of the paper.

Importing the package hides library warnings that are expected in this project and harmless
(:data:`EXPECTED_LIBRARY_WARNINGS`); the scripts import it before diffusers and transformers.
"""

import logging

# (logger, part of the message): each is expected here and says nothing a user must act on.
EXPECTED_LIBRARY_WARNINGS = (
    # The project uses the PIL image processors; torchvision is not needed.
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    # CoMat LoRAs hold UNet weights only, so diffusers finds no text-encoder keys on every load.
    ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"),
)


class _DropMessage(logging.Filter):
    def __init__(self, part):
        super().__init__()
        self.part = part

    def filter(self, record):
        return self.part not in record.getMessage()


for _logger_name, _part in EXPECTED_LIBRARY_WARNINGS:
    logging.getLogger(_logger_name).addFilter(_DropMessage(_part))
