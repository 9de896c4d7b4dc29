"""The web page at `GET /` (service/api/page.py, service/api/web/).

Without a browser: the page and its files are served with the Content-Security-Policy, hold no inline code,
style or remote URL, stay open when an API key is set while the API stays closed, and ship in the wheel; the
API reference (/docs) likewise, from this server's own files.

With a browser (the Debian `chromium` package, driven by Playwright; skipped with the reason only where no
browser can be had): a person's session against a real `blip2-serve` with the built-in model (caption,
questions streamed over the chat route, the gallery, a file that is not an image), /docs with every other
origin blocked, and the API's errors as the page shows them (API key asked for and refused, image too large, queue full with its retry time).
Screenshots are left in a folder printed in the output (`BLIP2_TEST_ARTIFACTS` chooses it).
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servertools import (
    EASY_VQA_COLOURS,
    EASY_VQA_SHAPES,
    REPO,
    Gate,
    LiveServer,
    easy_vqa_facts,
    start_process,
)

from service.api import api_docs, page
from service.api.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings

SERVE = Path(sys.executable).parent / "blip2-serve"
COLOURS, SHAPES = EASY_VQA_COLOURS, EASY_VQA_SHAPES
WAIT_MS = 60_000  # bound on a wait for the page, never a measured figure


# -- without a browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare():
    """The app without its lifespan (no model loaded): the page needs none. An API key is set."""
    return TestClient(create_app(Settings(api_key="page-test-key", model=None, retrieval_model=None)))


class _Parsed(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data.strip()


def test_page_and_its_files_are_served_with_the_policy(bare):
    response = bare.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = dict(
        part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert policy["img-src"] == "'self' blob:"  # blob: only for previews of the person's own files
    assert response.headers["x-content-type-options"] == "nosniff"
    for name, kind in page.STATIC.items():
        served = bare.get(f"/static/{name}")
        assert served.status_code == 200 and served.headers["content-type"] == kind
        assert served.headers["content-security-policy"] == response.headers["content-security-policy"]
    assert bare.get("/static/../app.py").status_code in (401, 404)


def test_page_has_no_inline_code_no_remote_url_and_labels_its_controls():
    parsed = _Parsed()
    parsed.feed((page.WEB / "index.html").read_text())
    tags = parsed.tags
    scripts = [attrs for tag, attrs in tags if tag == "script"]
    assert scripts and all(attrs.get("src", "").startswith("/static/") for attrs in scripts)
    assert parsed.script_text == "" and not any(tag == "style" for tag, _ in tags)
    for tag, attrs in tags:
        assert "style" not in attrs and not any(name.startswith("on") for name in attrs), (tag, attrs)
    # every file the page names is one the server serves
    named = {attrs.get("src") or attrs.get("href") for tag, attrs in tags if tag in ("script", "link")}
    assert named == {f"/static/{name}" for name in page.STATIC}
    # nothing from the internet: no absolute URL in any of the page's files
    for path in page.WEB.iterdir():
        text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, never fetched
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name
    # every input has a label (keyboard and screen-reader users reach each one by name)
    labelled = {attrs["for"] for tag, attrs in tags if tag == "label" and "for" in attrs}
    inputs = [attrs for tag, attrs in tags if tag == "input" and attrs.get("type") != "checkbox"]
    assert inputs and all(attrs["id"] in labelled for attrs in inputs), inputs


def test_page_is_open_with_an_api_key_and_the_api_is_not(bare):
    assert bare.get("/").status_code == 200
    assert bare.get("/static/app.js").status_code == 200
    refused = bare.get("/v1/models")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
    assert bare.get("/static/other.js").status_code == 401  # only the page's own files are open
    assert bare.get("/v1/models", headers={"Authorization": "Bearer page-test-key"}).status_code == 200
    # the files never carry the key
    for name in ["index.html", *page.STATIC]:
        assert "page-test-key" not in (page.WEB / name).read_text()


def test_unknown_file_is_a_json_404():
    client = TestClient(create_app(Settings(model=None, retrieval_model=None)))
    response = client.get("/static/nope.js")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_api_reference_is_served_from_this_server(bare):
    """/docs: Swagger UI's files from the installed package and a start-up script from service/api/web/, nothing
    inline and nothing from another origin, under the page's policy plus `data:` images; no ReDoc."""
    # served without the key, as the page is (a browser's navigation carries none); the API stays behind it
    response = bare.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = dict(
        part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";")
    )
    assert policy == {**page.POLICY, "img-src": "'self' blob: data:"}
    parsed = _Parsed()
    parsed.feed(response.text)
    assert parsed.script_text == "" and not any(tag == "style" for tag, _ in parsed.tags)
    named = {attrs.get("src") or attrs.get("href") for tag, attrs in parsed.tags if tag in ("script", "link")}
    assert named == {"/static/icon.svg", *(f"/docs/{name}" for name in api_docs.FILES)}
    for name, kind in api_docs.FILES.items():
        served = bare.get(f"/docs/{name}")
        assert served.status_code == 200 and served.headers["content-type"] == kind, name
        assert served.headers["content-security-policy"] == response.headers["content-security-policy"]
        assert not re.search(r"(https?:)?//cdn|jsdelivr|unpkg", served.text[:2000]), name
    key = {"Authorization": "Bearer page-test-key"}
    assert "SwaggerUIBundle" in bare.get("/docs/swagger-ui-bundle.js").text
    assert bare.get("/docs/oauth2-redirect.html", headers=key).status_code == 404
    assert bare.get("/redoc", headers=key).status_code == 404  # FastAPI's ReDoc loads a CDN script: off
    document = bare.get("/openapi.json")  # it says which routes need the key, for the page's Authorize button
    assert document.status_code == 200
    assert document.json()["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    assert bare.get("/docs/other.js").status_code == 401  # only the reference's own files are open


def test_web_files_ship_in_the_package():
    """pyproject.toml's package-data for `service` names every file of service/api/web/ (tomllib is 3.11+)."""
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    patterns = ast.literal_eval(re.search(r"^service = (\[.*\])$", section, re.M).group(1))
    for path in page.WEB.iterdir():
        relative = path.relative_to(REPO / "service").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def test_readme_shows_the_page():
    shown = re.findall(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", (REPO / "README.md").read_text())
    assert "docs/page.png" in shown
    with Image.open(REPO / "docs" / "page.png") as screenshot:
        assert screenshot.format == "PNG" and screenshot.width >= 1000


# -- in a browser ------------------------------------------------------------------------------------
def _browser_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="no browser: the playwright package is missing"
    )
    executable = _browser_path()
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as exc:  # no system browser and none downloaded by playwright
            pytest.skip(f"no browser: no chromium on PATH and Playwright has none ({type(exc).__name__})")
        yield launched
        launched.close()


def _offline(tab, origin: str) -> list[str]:
    """Blocks every request to another origin (as on a machine without internet) and returns, as they come,
    the URLs that were tried: the page and /docs promise to need none."""
    tried: list[str] = []

    def only_this_server(route) -> None:
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            tried.append(route.request.url)
            route.abort()

    tab.route("**/*", only_this_server)
    return tried


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, request) -> Path:
    folder = Path(os.environ.get("BLIP2_TEST_ARTIFACTS") or tmp_path_factory.mktemp("page"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    shots = sorted(p.name for p in folder.glob("*.png"))
    if shots:
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print(f"\npage screenshots ({', '.join(shots)}) in {folder}")


@pytest.fixture(scope="module")
def easy_vqa_images() -> list[tuple[Path, str, str]]:
    """Test images whose colour and shape follow from their own questions' answers: (path, colour, shape)."""
    easy_vqa = pytest.importorskip("easy_vqa")
    _, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [(Path(paths[i]), *facts) for i, facts in easy_vqa_facts(answers, image_ids).items()]


needs_default_model = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "generation").is_dir(), reason="no packaged default model"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`blip2-serve` with no arguments (the built-in model), in its own process, as a person starts it."""
    env = {"BLIP2_GALLERY_DIR": str(tmp_path_factory.mktemp("gallery"))}
    process, url = start_process([], env, entry=[str(SERVE)])
    yield url
    process.terminate()
    try:
        process.wait(60)
    except Exception:
        process.kill()
        process.wait()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _distinct(images: list[tuple[Path, str, str]], count: int) -> list[tuple[Path, str, str]]:
    """`count` images that share no colour and no shape: a text search has one right answer."""
    chosen: list[tuple[Path, str, str]] = []
    for image in images:
        if all(image[1] != other[1] and image[2] != other[2] for other in chosen):
            chosen.append(image)
    return chosen[:count]


@needs_default_model
def test_a_session_in_the_browser(browser, served, easy_vqa_images, artifacts):
    """The issue's session: caption, questions over the chat route, three images in the gallery and a text
    search that finds the right one first, then a file that is not an image."""
    from playwright.sync_api import expect

    (path, colour, shape), wanted, other = _distinct(easy_vqa_images, 3)
    tab = browser.new_page(viewport={"width": 1200, "height": 900})
    tab.set_default_timeout(WAIT_MS)
    elsewhere = _offline(tab, served)
    tab.goto(served + "/")
    expect(tab.locator("#server-status")).to_contain_text("ready")
    expect(tab.locator("#gallery-status")).to_have_text("The gallery holds 0 images.")
    choose = tab.get_by_label("Choose an image")
    add = tab.get_by_role("button", name="Add this image to the gallery")
    like = tab.get_by_role("button", name="Find images like this one")
    status = tab.locator("#gallery-status")

    # two images into the gallery, each chosen with the file input and added with the button; the status
    # names the file and the start of its content-named id
    for image_path, _, _ in (wanted, other):
        choose.set_input_files(image_path)
        add.click()
        expect(status).to_contain_text(
            re.compile(rf"Added: {re.escape(image_path.name)} \(id [0-9a-f]{{8}}…\)\.")
        )

    # the third: its preview and its caption; the news of the last add goes with the image it was about
    choose.set_input_files(path)
    expect(status).to_have_text("The gallery holds 2 images.")
    expect(tab.locator("#preview")).to_be_visible()
    caption = tab.locator("#caption:not(.pending)")
    expect(caption).not_to_have_text("Captioning…")
    words = _words(caption.inner_text())
    assert words & set(COLOURS) == {colour} and words & set(SHAPES) == {shape}, caption.inner_text()

    # questions, typed and sent with the keyboard, answered over the chat route as server-sent events
    question = tab.get_by_label("Question", exact=True)
    question.fill("what color is the shape?")
    with tab.expect_response("**/v1/chat/completions") as streamed:
        question.press("Enter")
    assert streamed.value.headers["content-type"].startswith("text/event-stream")
    assert streamed.value.request.post_data_json["stream"] is True
    answers = tab.locator("#conversation .answer")
    expect(answers.nth(0)).to_have_text(colour)
    question.fill("what shape is it?")
    question.press("Enter")
    expect(answers.nth(1)).to_have_text(shape)
    expect(tab.locator("#conversation li")).to_have_count(2)
    expect(tab.locator("#ask-error")).to_be_hidden()

    # the third into the gallery too (twice: the second time it is already there)
    add.click()
    expect(status).to_contain_text(f"The gallery holds 3 images. Added: {path.name} (id ")
    add.click()
    expect(status).to_contain_text("The gallery holds 3 images. Already there")

    # a text search: the right image first, shown as a thumbnail with one relevance number (ITM re-ranked:
    # above 1), the results in its order; the scores it comes from and the id behind a details toggle
    search = tab.get_by_label("Search the gallery by text")
    search.fill(f"a {wanted[1]} {wanted[2]}")
    search.press("Enter")
    results = tab.locator("#results li")
    expect(results).to_have_count(3)
    first = results.nth(0)
    expect(first).to_contain_text(f"1. {wanted[0].name}")
    expect(first.locator(".relevance")).to_have_text(re.compile(r"^relevance 1\.\d{3}$"))
    shown = [float(text.split()[1]) for text in results.locator(".relevance").all_inner_texts()]
    assert shown == sorted(shown, reverse=True), shown
    details = first.locator("details")
    expect(details.get_by_text(re.compile(r"^ITC "))).to_be_hidden()
    details.get_by_text("Scores and id").click()
    expect(details).to_contain_text(
        re.compile(r"score -?\d+\.\d\d\s*match \d+%\s*ITC -?\d\.\d{3}\s*id [0-9a-f]{32}")
    )
    thumbnail = first.get_by_role("img", name=wanted[0].name)
    expect(thumbnail).to_have_js_property("naturalWidth", 64)  # the stored image itself, 64 px
    expect(tab.locator("#results-heading")).to_have_text(f"3 best matches for “a {wanted[1]} {wanted[2]}”")
    expect(tab.locator("#gallery-error")).to_be_hidden()
    tab.screenshot(path=artifacts / "page-desktop.png", full_page=True)

    # images like the chosen one (an image query): itself first
    like.click()
    expect(tab.locator("#results-heading")).to_have_text("3 best matches for images like this one")
    expect(first).to_contain_text(f"1. {path.name}")
    expect(first.locator(".relevance")).to_have_text("relevance 1.000")  # the same image: cosine 1

    # removing the first asks first: declined, nothing is deleted; confirmed, it goes and the rest are
    # numbered from 1 again
    asked: list[str] = []

    def answer(accept: bool):
        def handle(dialog) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        return handle

    remove = tab.get_by_role("button", name=f"Remove {path.name} from the gallery")
    tab.once("dialog", answer(False))
    remove.click()
    assert asked == [f"Remove {path.name} from the gallery? This cannot be undone."]
    expect(results).to_have_count(3)
    assert httpx.get(served + "/gallery").json()["count"] == 3
    tab.once("dialog", answer(True))
    remove.click()
    expect(results).to_have_count(2)
    expect(status).to_have_text(f"The gallery holds 2 images. Removed {path.name}.")
    expect(results.locator(".rank")).to_have_text(["1.", "2."])
    expect(tab.locator("#results-heading")).to_have_text("2 best matches for images like this one")

    # a file that is not an image: the API's own error text; it is never sent again (Add and Find-like
    # off, Ask says why and sends nothing), and the old gallery news and results go
    chat_calls: list[str] = []
    tab.on("request", lambda request: chat_calls.append(request.url) if "/v1/chat" in request.url else None)
    choose.set_input_files({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image at all"})
    error = tab.locator("#image-error")
    expect(error).to_contain_text("cannot decode the image: not a supported image format")
    expect(error).to_contain_text("400 invalid_image")
    expect(tab.locator("#caption")).to_have_text("No caption.")
    expect(tab.locator("#preview")).to_be_hidden()
    expect(tab.locator("#conversation li")).to_have_count(0)  # a new image starts a new conversation
    expect(add).to_be_disabled()
    expect(like).to_be_disabled()
    question.fill("what color is the shape?")
    question.press("Enter")
    expect(tab.locator("#ask-error")).to_have_text(
        "The server cannot read this file. Choose, drop or paste an image."
    )
    assert chat_calls == []
    expect(status).to_have_text("The gallery holds 2 images.")
    expect(results).to_have_count(0)
    expect(tab.locator("#results-heading")).to_be_empty()
    tab.screenshot(path=artifacts / "page-not-an-image.png", full_page=True)
    assert elsewhere == []
    tab.close()


def test_api_reference_offline_in_the_browser(browser, served):
    """/docs in a browser that can reach this server only: Swagger UI starts and lists the operations, with
    no request elsewhere and nothing refused by the Content-Security-Policy."""
    from playwright.sync_api import expect

    tab = browser.new_page(viewport={"width": 1200, "height": 900})
    tab.set_default_timeout(WAIT_MS)
    elsewhere = _offline(tab, served)
    problems: list[str] = []
    tab.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.goto(served + "/")
    tab.get_by_role("link", name="API reference").click()  # the page's footer link
    operations = tab.locator(".opblock-summary-path")
    for path in ("/caption", "/vqa", "/v1/chat/completions", "/gallery/search"):
        expect(operations.filter(has_text=re.compile(rf"^{re.escape(path)}$"))).to_be_visible()
    tab.locator(".opblock-summary", has_text="/vqa").first.click()  # an operation opens, with its icons
    expect(tab.locator(".opblock-description-wrapper").first).to_contain_text("short answer")
    assert elsewhere == [] and problems == [], (elsewhere, problems)
    tab.close()


@needs_default_model
def test_gallery_file_route_serves_the_stored_bytes(served, easy_vqa_images):
    """GET /gallery/images/{id}/file, which the page's thumbnails come from: the bytes as added, their type,
    and an ETag a browser revalidates with."""
    path = easy_vqa_images[5][0]
    with httpx.Client(base_url=served, timeout=60) as client:
        added = client.post("/gallery/images", files={"images": (path.name, path.read_bytes())})
        assert added.status_code == 200, added.text
        image_id = added.json()["images"][0]["id"]
        file = client.get(f"/gallery/images/{image_id}/file")
        assert file.status_code == 200 and file.content == path.read_bytes()
        assert (
            file.headers["content-type"] == "image/png"
            and file.headers["x-content-type-options"] == "nosniff"
        )
        again = client.get(
            f"/gallery/images/{image_id}/file", headers={"If-None-Match": file.headers["etag"]}
        )
        assert again.status_code == 304 and not again.content
        missing = client.get("/gallery/images/no-such-image/file")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        assert client.delete(f"/gallery/images/{image_id}").status_code == 200


@needs_default_model
def test_phone_width_and_keyboard_only(browser, served, easy_vqa_images, artifacts):
    from playwright.sync_api import expect

    path, colour, _ = easy_vqa_images[1]
    # two images added as curl and `blip2-serve gallery add` add them: no name, or a path, in the metadata
    with httpx.Client(base_url=served, timeout=60) as client:
        added = [
            client.post("/gallery/images", files={"images": ("x.png", image.read_bytes())}, data=form)
            for image, form in (
                (easy_vqa_images[7][0], {}),
                (easy_vqa_images[8][0], {"metadata": '{"path": "shapes/the-eighth.png"}'}),
            )
        ]
    unnamed, pathed = (response.json()["images"][0]["id"] for response in added)
    tab = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    tab.set_default_timeout(WAIT_MS)
    elsewhere = _offline(tab, served)
    tab.goto(served + "/")
    expect(tab.locator("#server-status")).to_contain_text("ready")
    # focus order follows the page: the file chooser first, then the question, its option, the gallery
    tab.keyboard.press("Tab")
    expect(tab.locator("#file-input")).to_be_focused()
    tab.locator("#file-input").set_input_files(path)  # the chooser itself is the system's dialog
    expect(tab.locator("#caption:not(.pending)")).not_to_have_text("Captioning…")
    tab.locator("#file-input").focus()
    tab.keyboard.press("Tab")
    expect(tab.locator("#question")).to_be_focused()
    tab.keyboard.type("what color is the shape?")
    tab.keyboard.press("Enter")
    expect(tab.locator("#conversation .answer")).to_have_text(colour)
    tab.keyboard.press("Tab")
    tab.keyboard.press("Tab")
    expect(tab.locator("#with-context")).to_be_focused()
    for control in ("#add-button", "#like-button", "#search-text", "#search-button"):
        tab.keyboard.press("Tab")
        expect(tab.locator(control)).to_be_focused()
    tab.keyboard.press("Shift+Tab")
    tab.keyboard.type(f"a {colour} circle")
    tab.keyboard.press("Enter")
    expect(tab.locator("#results-heading")).to_contain_text(f"best matches for “a {colour} circle”")
    # each result's title fits on one line: the file's name from the metadata, else the id's start
    titles = {
        unnamed: re.compile(rf"^\d\. {unnamed[:8]}…$"),
        pathed: re.compile(r"^\d\. the-eighth\.png$"),
    }
    for image_id, title in titles.items():
        name = tab.locator(f'#results li[data-id="{image_id}"] .name')
        expect(name).to_have_text(title)
        line_height = name.evaluate("element => parseFloat(getComputedStyle(element).lineHeight)")
        assert name.bounding_box()["height"] < 1.5 * line_height, name.inner_text()
    # nothing is wider than the screen
    for selector in ("header", "main", ".card", "#ask-form", "#drop-zone"):
        for box in (
            tab.locator(selector).nth(i).bounding_box() for i in range(tab.locator(selector).count())
        ):
            if box:
                assert box["x"] >= 0 and box["x"] + box["width"] <= 390, (selector, box)
    tab.screenshot(path=artifacts / "page-phone.png", full_page=True)
    assert elsewhere == []
    tab.close()


@pytest.fixture(scope="module")
def guarded():
    """The built-in generation model only, with an API key, a small image limit and a queue of one."""
    settings = Settings(
        model=str(DEFAULT_MODEL_DIR / "generation"),
        api_key="open-sesame-42",
        max_image_bytes=4096,
        max_queue_size=1,
        max_batch_size=1,
        load_in_8bit=False,
    )
    with LiveServer(settings) as live:
        yield live


def _big_png() -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


@needs_default_model
def test_api_key_and_errors_in_the_browser(browser, guarded, easy_vqa_images, artifacts):
    from playwright.sync_api import expect

    path, colour, shape = easy_vqa_images[2]
    tab = browser.new_page(viewport={"width": 1000, "height": 900})
    tab.set_default_timeout(WAIT_MS)
    sent_keys = []
    tab.on(
        "request", lambda r: sent_keys.append(r.headers.get("authorization")) if "/caption" in r.url else None
    )
    elsewhere = _offline(tab, guarded.url)
    tab.goto(guarded.url + "/")

    # the page asks for the key, focused; a wrong one is refused, the right one is sent as a bearer token
    key = tab.get_by_label("Key", exact=True)
    expect(key).to_be_focused()
    expect(tab.locator("#server-status")).to_have_text("This server needs an API key.")
    key.fill("wrong")
    key.press("Enter")
    expect(tab.locator("#key-message")).to_contain_text("refused")
    key.fill("open-sesame-42")
    key.press("Enter")
    expect(tab.locator("#server-status")).to_contain_text("ready")
    expect(tab.locator("#key-panel")).to_be_hidden()
    # no retrieval model: the API's reason, said once
    expect(tab.locator("#gallery-status")).to_have_text(
        re.compile(r"^This server has no retrieval model loaded; start it with --retrieval-model \S+")
    )
    tab.get_by_label("Choose an image").set_input_files(path)
    expect(tab.locator("#caption:not(.pending)")).to_contain_text(colour)
    assert sent_keys == ["Bearer open-sesame-42"]

    # an image over the server's byte limit: 413 and the API's message
    tab.get_by_label("Choose an image").set_input_files(
        {"name": "big.png", "mimeType": "image/png", "buffer": _big_png()}
    )
    error = tab.locator("#image-error")
    expect(error).to_contain_text("The image is too large for this server.")
    expect(error).to_contain_text("is over 4096 bytes")

    # the queue full: 429 and its retry time (the model thread held, one request running, one queued)
    state = guarded.app.state.server
    image = path.read_bytes()
    headers = {"Authorization": "Bearer open-sesame-42"}
    with (
        ThreadPoolExecutor(2) as pool,
        httpx.Client(base_url=guarded.url, headers=headers, timeout=120) as client,
    ):
        with Gate(guarded.app) as gate:
            ahead = [pool.submit(client.post, "/caption", files={"image": ("a.png", image)})]
            gate.wait_taken()
            ahead.append(pool.submit(client.post, "/caption", files={"image": ("b.png", image)}))
            gate.wait_queued(1)
            tab.get_by_label("Choose an image").set_input_files(path)
            expect(error).to_contain_text("The server is busy: its queue is full. Try again in")
            expect(error).to_contain_text("429 overloaded")
            retry = state.batcher.retry_after_s()
            expect(error).to_contain_text(f"Try again in {retry} s.")
            tab.screenshot(path=artifacts / "page-queue-full.png", full_page=True)
        assert [f.result().status_code for f in ahead] == [200, 200]
    assert elsewhere == []
    tab.close()


@needs_default_model
def test_api_reference_with_an_api_key_in_the_browser(browser, guarded):
    """/docs on a server with an API key (the page's footer link goes there without one): the reference opens,
    a call tried from it is refused until the key is given to "Authorize", then answered."""
    from playwright.sync_api import expect

    tab = browser.new_page(viewport={"width": 1200, "height": 900})
    tab.set_default_timeout(WAIT_MS)
    elsewhere = _offline(tab, guarded.url)
    tab.goto(guarded.url + "/docs")
    models = tab.locator(
        ".opblock", has=tab.locator(".opblock-summary-path", has_text=re.compile(r"^/v1/models$"))
    )
    models.locator(".opblock-summary").click()
    models.get_by_role("button", name="Try it out").click()
    status = models.locator(".live-responses-table tbody .response-col_status")
    models.get_by_role("button", name="Execute").click()
    expect(status).to_have_text("401")
    tab.locator(".auth-wrapper .authorize").click()
    dialog = tab.locator(".dialog-ux")
    dialog.get_by_role("textbox").fill("open-sesame-42")
    dialog.get_by_role("button", name="Apply credentials").click()
    dialog.get_by_role("button", name="Close", exact=True).click()
    models.get_by_role("button", name="Execute").click()
    expect(status).to_have_text("200")
    assert elsewhere == []
    tab.close()


@pytest.fixture(scope="module")
def retrieval_only():
    settings = Settings(model=None, retrieval_model=str(DEFAULT_MODEL_DIR / "stage1"), load_in_8bit=False)
    with LiveServer(settings) as live:
        yield live


@needs_default_model
def test_model_not_loaded_in_the_browser(browser, retrieval_only, easy_vqa_images):
    from playwright.sync_api import expect

    tab = browser.new_page()
    tab.set_default_timeout(WAIT_MS)
    elsewhere = _offline(tab, retrieval_only.url)
    tab.goto(retrieval_only.url + "/")
    expect(tab.locator("#server-status")).to_contain_text("ready")
    # a retrieval model but no gallery folder: the API's reason, said once ("No gallery on this server: this
    # server has no gallery; ..." before)
    expect(tab.locator("#gallery-status")).to_have_text(
        re.compile(r"^This server has no gallery; start it with --gallery-dir \(BLIP2_GALLERY_DIR\)\.$")
    )
    tab.get_by_label("Choose an image").set_input_files(easy_vqa_images[0][0])
    error = tab.locator("#image-error")
    expect(error).to_contain_text("This server does not have that model loaded.")
    expect(error).to_contain_text("this server has no generation model loaded")
    expect(error).to_contain_text("501 model_not_loaded")
    assert elsewhere == []
    tab.close()
