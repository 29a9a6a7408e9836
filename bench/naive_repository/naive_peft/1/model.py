"""A naive multi-adapter server: PEFT inside a Triton Python model, one request at a time.

The measuring stick of issue 14 (bench/naive_peft.py): every LoRA adapter of $MULTIADAPTER_ADAPTER_DIR is
loaded into one `PeftModel` over the base of $MULTIADAPTER_BASE_MODEL at start; each request then runs alone:
`set_adapter` (or `disable_adapter` for the base), tokenize, greedy `generate`, decode. This is how PEFT's
documentation serves several adapters, without batching across requests. Not part of the product.
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_MAX_TOKENS = 64


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("num_threads", "1")))
        base = Path(os.environ["MULTIADAPTER_BASE_MODEL"])
        store = Path(os.environ["MULTIADAPTER_ADAPTER_DIR"])
        adapters = sorted(p.name for p in store.iterdir() if (p / "adapter_config.json").is_file())
        adapters = [
            a
            for a in adapters
            if json.loads((store / a / "adapter_config.json").read_text()).get("peft_type") == "LORA"
        ]
        if not adapters:
            raise pb_utils.TritonModelException(f"naive_peft: no PEFT LoRA adapter in {store}")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        first, *rest = adapters
        model = PeftModel.from_pretrained(model, store / first, adapter_name=first)
        for adapter_id in rest:
            model.load_adapter(store / adapter_id, adapter_name=adapter_id)
        self.model = model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.adapters = set(adapters)
        self.torch = torch

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._answer(request))
            except Exception as exc:  # one request's failure is its own answer
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

    def _answer(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0].decode()
        adapter_id = (
            pb_utils.get_input_tensor_by_name(request, "adapter_id").as_numpy().reshape(-1)[0].decode()
        )
        tokens = pb_utils.get_input_tensor_by_name(request, "max_tokens")
        max_tokens = int(tokens.as_numpy().reshape(-1)[0]) if tokens is not None else DEFAULT_MAX_TOKENS
        if adapter_id and adapter_id not in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} does not exist on this server")
        inputs = self.tokenizer(text, return_tensors="pt")
        config = self.model.base_model.model.generation_config
        settings = dict(max_new_tokens=max_tokens, do_sample=False, pad_token_id=config.pad_token_id)
        with self.torch.inference_mode():
            if adapter_id:
                self.model.set_adapter(adapter_id)
                output = self.model.generate(**inputs, **settings)
            else:
                with self.model.disable_adapter():
                    output = self.model.generate(**inputs, **settings)
        new = output[0, inputs["input_ids"].shape[1] :].tolist()
        answer = self.tokenizer.decode(new, skip_special_tokens=True)
        tensors = [
            ("text_output", np.array([[answer.encode()]], dtype=object)),
            ("served_adapter_id", np.array([[adapter_id.encode()]], dtype=object)),
            ("adapter_version", np.array([[b""]], dtype=object)),
            ("generated_tokens", np.array([[len(new)]], dtype=np.int32)),
        ]
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, v) for n, v in tensors])
