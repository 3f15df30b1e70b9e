"""The Python-backend model of a Triton repository (copied there as pipeline/1/model.py by triton_repo.py).

txt2img: tokenizer and scheduler run here, the networks through BLS calls to the repository's ONNX
models (text_encoder, unet, vae_decoder), with the same random draws as runtime.pipeline for a seed
(one CPU torch.Generator: the initial noise, then the scheduler's per-step noise), prompts read as
plain text (77 tokens, no A1111 weighting). Triton's Python environment needs `sd-runtime` installed
(its tokenizer and schedulers, and torch for their tensors).

Inputs (each [1]; all but `prompt` optional): prompt, negative_prompt, scheduler (BYTES); steps, width,
height (INT32); guidance (FP32); seed (INT64). Output: image, UINT8 [1, height, width, 3].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from runtime.schedulers import SCHEDULER_NAMES, make_scheduler
from runtime.tokenizer import CLIPTokenizer

DEFAULTS = {"negative_prompt": "", "steps": 30, "guidance": 7.5, "seed": 0, "scheduler": ""}
LIMITS = {"steps": (1, 150), "width": (8, 2048), "height": (8, 2048)}


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
        self.scheduler_config = json.loads((folder / "scheduler_config.json").read_text())
        self.model = json.loads((folder / "pipeline.json").read_text())  # sizes, scaling, network names

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                image = self._generate(self._inputs(request))
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", image)]))
            except (ValueError, RuntimeError) as err:  # one request's failure is its own error response
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err))))
        return responses

    def _inputs(self, request) -> dict:
        values = dict(DEFAULTS, width=self.model["width"], height=self.model["height"])
        for name in ("prompt", "negative_prompt", "scheduler", "steps", "width", "height", "guidance", "seed"):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                if name == "prompt":
                    raise ValueError("input 'prompt' is required")
                continue
            value = tensor.as_numpy().reshape(-1)[0]
            values[name] = value.decode("utf-8") if isinstance(value, bytes) else value.item()
        for name, (low, high) in LIMITS.items():
            if not low <= values[name] <= high:
                raise ValueError(f"input '{name}' must be in [{low}, {high}], got {values[name]}")
        factor = self.model["vae_factor"]
        if values["width"] % factor or values["height"] % factor:
            raise ValueError(f"inputs 'width' and 'height' must be multiples of {factor}")
        if values["scheduler"] and values["scheduler"] not in SCHEDULER_NAMES:
            raise ValueError(f"input 'scheduler' must be one of {', '.join(SCHEDULER_NAMES)}")
        if not 0 <= values["seed"] < 2**32:
            raise ValueError(f"input 'seed' must be in [0, 2**32), got {values['seed']}")
        return values

    def _call(self, model: str, inputs: dict, output: str) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=self.model["networks"][model],
            requested_output_names=[output],
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()

    def _generate(self, values: dict) -> np.ndarray:
        guided = values["guidance"] > 1
        texts = ([values["negative_prompt"]] if guided else []) + [values["prompt"]]
        ids = self.tokenizer(texts).numpy().astype(np.int64)
        context = self._call("text_encoder", {"input_ids": ids}, "last_hidden_state")
        scheduler = make_scheduler(values["scheduler"] or None, self.scheduler_config)
        scheduler.set_timesteps(values["steps"])
        factor = self.model["vae_factor"]
        shape = (1, self.model["latent_channels"], values["height"] // factor, values["width"] // factor)
        generator = torch.Generator("cpu").manual_seed(values["seed"])
        latents = torch.randn(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
        noise = scheduler.draw_noise(generator, shape, torch.float32, "cpu")
        for i in range(scheduler.num_steps):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, i)
            timestep = np.full((model_input.shape[0],), float(scheduler.timesteps[i]), dtype=np.float32)
            inputs = {"sample": model_input.numpy(), "timestep": timestep, "encoder_hidden_states": context}
            prediction = torch.from_numpy(self._call("unet", inputs, "out_sample"))
            if guided:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + values["guidance"] * (cond - uncond)
            latents = scheduler.step(prediction, i, latents, noise=None if noise is None else noise[i])
        decoded = self._call("vae_decoder", {"latent": (latents / self.model["scaling_factor"]).numpy()}, "images")
        pixels = np.clip(decoded * 0.5 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        return (pixels * 255).round().astype(np.uint8)
