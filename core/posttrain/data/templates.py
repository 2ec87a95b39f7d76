"""Turn a problem into the text the model sees."""

from __future__ import annotations


def render_prompt(tokenizer, prompt: str, *, template: str | None = None, system_prompt: str | None = None) -> str:
    """``template.format(prompt=...)`` when a template is configured, else the chat template."""
    if template is not None:
        if "{prompt}" not in template:
            raise ValueError(f"data.template must contain '{{prompt}}', got {template!r}")
        text = template.replace("{prompt}", prompt)  # not str.format: LaTeX braces in templates stay literal
        return f"{system_prompt}\n{text}" if system_prompt else text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: set data.template (e.g. 'Question: {prompt}\\nAnswer:')")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
