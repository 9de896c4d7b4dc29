"""One profile per generation task (/caption, /vqa, /generate), built once when the model loads: the server's
prompt for the task, its generation defaults (the paper's, overridden by what the model folder's
generation_config.json sets) and the server's bounds on a request. A route asks its profile for the request's
`GenerationTask` before decoding the image; a request out of bounds is refused with `InvalidInput`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from blip2.prompts import CAPTION_DEFAULTS, GENERATE_DEFAULTS, VQA_DEFAULTS
from service.engine.batching import InvalidInput
from service.engine.jobs import GenerationOptions
from service.engine.loading import GenerationModel
from service.engine.prompts import Prompt, family_prompts
from service.settings import Settings


class GenerationParams(Protocol):
    """What a request may set of its generate call (None: the task's default), as the API's schemas hold it."""

    max_new_tokens: int | None
    min_new_tokens: int | None
    num_beams: int | None
    length_penalty: float | None
    do_sample: bool
    temperature: float
    top_p: float
    repetition_penalty: float


def check_text(settings: Settings, name: str, text: str) -> str:
    """A person's text, refused when it is longer than the server takes (`name` says which field)."""
    if len(text) > settings.max_prompt_chars:
        raise InvalidInput(f"{name}: at most {settings.max_prompt_chars} characters")
    return text


@dataclass(frozen=True)
class GenerationTask:
    """What one request asks of the generation model, within bounds: its prompt and its generate options."""

    prompt: str | Prompt  # the server's own text (a string) or one holding a person's texts
    options: GenerationOptions


@dataclass(frozen=True)
class TaskProfile:
    """What every generation task holds: its defaults and the settings that bound a request (text length,
    max_new_tokens, num_beams)."""

    defaults: Mapping[str, Any]
    settings: Settings

    def options(self, params: GenerationParams) -> GenerationOptions:
        """The request's options over the task's defaults, refused beyond the server's bounds."""
        values = {
            k: getattr(params, k) if getattr(params, k) is not None else v for k, v in self.defaults.items()
        }
        if values["max_new_tokens"] > self.settings.max_new_tokens_limit:
            raise InvalidInput(f"max_new_tokens: at most {self.settings.max_new_tokens_limit}")
        if values["num_beams"] > self.settings.max_num_beams:
            raise InvalidInput(f"num_beams: at most {self.settings.max_num_beams}")
        # The maximum wins, as in transformers' generate(): the document cannot tie one field's bound to another's
        values["min_new_tokens"] = min(values["min_new_tokens"], values["max_new_tokens"])
        return GenerationOptions(
            **values,
            do_sample=params.do_sample,
            temperature=params.temperature,
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
        )


@dataclass(frozen=True)
class CaptionProfile(TaskProfile):
    prompt: str  # the server's caption prompt for the model family

    def task(self, params: GenerationParams, prompt: str | None) -> GenerationTask:
        options = self.options(params)
        # the client's prompt is a person's text (processed as the model was trained); the default is the server's
        if prompt is None:
            return GenerationTask(self.prompt, options)
        return GenerationTask(Prompt.person(check_text(self.settings, "prompt", prompt)), options)


@dataclass(frozen=True)
class VqaProfile(TaskProfile):
    template: str  # the server's VQA template for the model family, `{}` where the question goes

    def task(self, params: GenerationParams, question: str, template: str | None) -> GenerationTask:
        options = self.options(params)
        if template is not None:  # each text as the document bounds it; tokens in all, later
            check_text(self.settings, "prompt_template", template)
        template = template or self.template
        if template.count("{}") != 1:
            raise InvalidInput("prompt_template: must hold exactly one `{}` for the question")
        prompt = Prompt.question(template, check_text(self.settings, "question", question))
        return GenerationTask(prompt, options)


@dataclass(frozen=True)
class GenerateProfile(TaskProfile):
    def task(self, params: GenerationParams, prompt: str) -> GenerationTask:
        options = self.options(params)
        return GenerationTask(Prompt.person(check_text(self.settings, "prompt", prompt)), options)


@dataclass(frozen=True)
class TaskProfiles:
    caption: CaptionProfile
    vqa: VqaProfile  # the chat folds its turns with this task's template
    generate: GenerateProfile


def task_profiles(gen: GenerationModel, settings: Settings) -> TaskProfiles:
    """The loaded generation model's task profiles; each task's defaults are the paper's, overridden by what
    the model folder's generation_config.json sets (e.g. a model whose captions are shorter than the paper's
    8-token minimum); a request overrides both."""
    prompts = family_prompts(gen, settings)
    return TaskProfiles(
        caption=CaptionProfile(CAPTION_DEFAULTS | gen.generation_defaults, settings, prompts.caption),
        vqa=VqaProfile(VQA_DEFAULTS | gen.generation_defaults, settings, prompts.vqa_template),
        generate=GenerateProfile(GENERATE_DEFAULTS | gen.generation_defaults, settings),
    )
