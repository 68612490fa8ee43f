"""`python -m sft_recipes.chat run_dir=RUN`: talk to the fine-tuned model.

Interactive: a prompt with history, tokens streamed as they are generated, `/reset` to forget the history,
`/exit` (or Ctrl-D) to leave. One-shot, for scripts: `prompt="..."` prints the answer and exits. The run's
chat template and system prompt are used, as in training.
"""
from __future__ import annotations

import sys
import threading

USAGE = 'python -m sft_recipes.chat run_dir=RUN [prompt="..."] [max_new_tokens=256]'
DEFAULTS = {"run_dir": None, "prompt": "", "max_new_tokens": 256}


def answer(model, tok, conversation, max_new_tokens: int, stream=None) -> str:
    """Greedy answer to a conversation; with `stream`, each piece of text is passed to it as it comes."""
    import torch
    from transformers import TextIteratorStreamer

    inputs = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True).to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, streamer=streamer)
    worker = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs))
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if stream:
            stream(piece)
    worker.join()
    return "".join(pieces).strip()


def _cli(argv):
    from . import runs

    args = runs.parse_args(argv, DEFAULTS, USAGE)
    cfg = runs.config(args["run_dir"])
    tok = runs.tokenizer(args["run_dir"])
    model = runs.adapter_model(cfg, args["run_dir"])
    if args["prompt"]:
        print(answer(model, tok, runs.messages(cfg, args["prompt"]), args["max_new_tokens"]))
        return
    history = []
    print("Chat with the fine-tuned model. /reset forgets the conversation, /exit leaves.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not line:
            continue
        print("model> ", end="", flush=True)
        reply = answer(model, tok, runs.messages(cfg, line, history), args["max_new_tokens"],
                       stream=lambda piece: print(piece, end="", flush=True))
        print()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


if __name__ == "__main__":
    from .runs import main_guard

    sys.exit(main_guard(_cli))
