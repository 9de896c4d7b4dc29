// The page's one script. It calls the server's public API only (the routes, errors and API key a curl
// user has): /caption with the chosen file, /v1/chat/completions streamed token by token for questions,
// and the gallery routes when the server has a retrieval model. No library, no build step.

const $ = (id) => document.getElementById(id);

const state = {
  key: null, // the API key the person typed: in this tab's memory only, never stored
  file: null, // the chosen image, as the browser holds it; null again once the server refused it
  refused: false, // the server could not read the chosen file (not an image, too large): nothing resends it
  dataUri: null, // the same bytes as a data: URI, for the chat route's image_url part
  previewUrl: null,
  turns: [], // [{question, answer}] about the current image
  work: new AbortController(), // aborts what is in flight for the previous image
  galleryReady: false,
  galleryCount: 0,
  resultsFor: "", // what the shown results matched ("a blue circle", "images like this one")
};

// -- talking to the API -----------------------------------------------------------------------------

class ApiProblem extends Error {
  constructor(status, type, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.type = type;
    this.retryAfter = retryAfter;
  }
}

// fetch() with the key attached; any answer but a 2xx becomes an ApiProblem carrying the API's own error.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiProblem(0, "network", "the server did not answer (is it running?)");
  }
  if (!response.ok) {
    const problem = await problemOf(response);
    if (problem.status === 401) askForKey(true);
    throw problem;
  }
  return response;
}

async function problemOf(response) {
  let type = "http_error";
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json(); // {"error": {"type": ..., "message": ...}}
    if (body && body.error) {
      type = body.error.type || type;
      message = body.error.message || message;
    }
  } catch {
    // not JSON (a proxy's page): keep the status text
  }
  return new ApiProblem(response.status, type, message, response.headers.get("Retry-After"));
}

// A person's sentence about an API error: what happened, in words, then the API's own message.
function explain(problem) {
  const wait = problem.retryAfter ? ` Try again in ${problem.retryAfter} s.` : " Try again shortly.";
  switch (problem.status) {
    case 0:
      return ["Cannot reach the server.", problem.message];
    case 400:
      return [problem.type === "invalid_image" ? "The server cannot read this image." : "The request was refused.", problem.message];
    case 401:
      return ["This server needs a valid API key (enter it above).", problem.message];
    case 413:
      return ["The image is too large for this server.", problem.message];
    case 415:
    case 422:
      return ["The server refused the request.", problem.message];
    case 429:
      return [`The server is busy: its queue is full.${wait}`, problem.message];
    case 501:
      return ["This server does not have that model loaded.", problem.message];
    case 503:
      return [`The server is not ready.${wait}`, problem.message];
    case 504:
      return ["The server took too long to answer.", problem.message];
    default:
      return [`The server answered with an error (HTTP ${problem.status}).`, problem.message];
  }
}

const RETRYABLE = new Set([0, 429, 503, 504]); // worth trying again as it was: the server was busy or away

// Shows an error in `element` (null hides it): a sentence, the API's message and status, and for a busy
// server a "Try again" button that runs `retry`.
function showError(element, error, retry = null) {
  if (error === null) {
    element.hidden = true;
    element.replaceChildren();
    return;
  }
  const problem = error instanceof ApiProblem;
  const [lead, detail] = problem ? explain(error) : [String(error.message || error), ""];
  const strong = document.createElement("strong");
  strong.textContent = lead;
  const parts = [strong];
  if (detail) {
    const span = document.createElement("span");
    span.className = "detail";
    span.textContent = error.status ? `${detail} (${error.status} ${error.type})` : detail;
    parts.push(span);
  }
  if (retry && problem && RETRYABLE.has(error.status)) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Try again";
    button.addEventListener("click", () => {
      showError(element, null);
      retry();
    });
    parts.push(button);
  }
  element.replaceChildren(...parts);
  element.hidden = false;
}

// -- the server, the key ----------------------------------------------------------------------------

function askForKey(refused) {
  const panel = $("key-panel");
  const wasHidden = panel.hidden;
  panel.hidden = false;
  if (refused && state.key) $("key-message").textContent = "The server refused this key. Check it and try again.";
  if (wasHidden) $("api-key").focus();
}

async function connect() {
  const status = $("server-status");
  try {
    const models = await (await api("/v1/models")).json();
    const name = models.data && models.data[0] ? models.data[0].id : "a model";
    $("key-panel").hidden = true;
    status.textContent = `Serving ${name}.`;
    waitUntilReady(name);
    checkGallery();
  } catch (error) {
    status.textContent = error.status === 401 ? "This server needs an API key." : explain(error).join(" ");
  }
}

// /ready is open (no key): 200 once the model is loaded and warm; 503 while loading or shutting down.
async function waitUntilReady(name) {
  const status = $("server-status");
  for (;;) {
    const response = await fetch("/ready").catch(() => null);
    if (response && response.ok) {
      status.textContent = `Serving ${name}: ready.`;
      return;
    }
    const problem = response ? await problemOf(response) : null;
    const loading = !problem || problem.message.includes("loading");
    status.textContent = `Serving ${name}: ${loading ? "loading the model…" : problem.message}`;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim() || null;
  connect();
});

// -- the image: choose, drop or paste ---------------------------------------------------------------

function setImage(file) {
  state.work.abort();
  state.work = new AbortController();
  state.file = file;
  state.refused = false;
  state.dataUri = null;
  state.turns = [];
  $("conversation").replaceChildren();
  showError($("image-error"), null);
  showError($("ask-error"), null);
  clearGalleryNews(); // what the gallery said was about the previous image

  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  const preview = $("preview");
  preview.hidden = true;
  preview.onload = () => {
    sharpIfSmall(preview);
    preview.hidden = false;
  };
  preview.onerror = () => {
    preview.hidden = true;
  };
  preview.alt = `The chosen image, ${file.name || "pasted"}`;
  preview.src = state.previewUrl;
  $("drop-hint").textContent = "Drop or paste another image, or";
  $("file-name").textContent = `${file.name || "pasted image"} (${formatBytes(file.size)})`;
  enableGallery();
  caption(file, state.work.signal);
}

// Small images (easy-VQA's are 64 px) are enlarged with hard pixel edges instead of a blur.
function sharpIfSmall(image) {
  image.classList.toggle("pixelated", Math.max(image.naturalWidth, image.naturalHeight) < 160);
}

function formatBytes(size) {
  if (size < 1024) return `${size} bytes`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} kB`;
  return `${(size / 1024 / 1024).toFixed(1)} MB`;
}

function readDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function imageDataUri() {
  if (!state.dataUri) state.dataUri = await readDataUri(state.file);
  return state.dataUri;
}

$("file-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) setImage(file);
  event.target.value = ""; // choosing the same file again still counts
});

const dropZone = $("drop-zone");
document.addEventListener("dragover", (event) => {
  event.preventDefault(); // a file dropped anywhere is taken, never opened in place of the page
  dropZone.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (event.relatedTarget === null) dropZone.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  const file = event.dataTransfer.files[0];
  if (file) setImage(file);
});
document.addEventListener("paste", (event) => {
  const file = event.clipboardData && event.clipboardData.files[0];
  if (file) {
    event.preventDefault(); // text pasted into a box stays text
    setImage(file);
  }
});

// -- caption ----------------------------------------------------------------------------------------

async function caption(file, signal) {
  const target = $("caption");
  target.textContent = "Captioning…";
  target.classList.add("pending");
  const form = new FormData();
  form.append("image", file, file.name || "pasted.png");
  try {
    const response = await api("/caption", { method: "POST", body: form, signal });
    const answer = await response.json();
    target.textContent = answer.caption.trim() || "(an empty caption)";
  } catch (error) {
    if (error.name === "AbortError") return;
    target.textContent = "No caption.";
    if (REFUSED_IMAGE.has(error.status)) refuseImage();
    showError($("image-error"), error, () => caption(file, signal));
  } finally {
    if (!signal.aborted) target.classList.remove("pending");
  }
}

// The server cannot read this file (400: not an image; 413: too large) and no route will: it is dropped, so
// Add, Find-like and Ask never send it again. A busy or missing model (429, 501, 503) leaves it usable.
const REFUSED_IMAGE = new Set([400, 413]);

function refuseImage() {
  state.file = null;
  state.refused = true;
  state.dataUri = null;
  $("preview").hidden = true;
  enableGallery();
}

// -- questions: the chat route, streamed ------------------------------------------------------------

function addTurn(question) {
  const item = document.createElement("li");
  const asked = document.createElement("p");
  asked.className = "question";
  asked.textContent = question;
  const answered = document.createElement("p");
  answered.className = "answer pending";
  answered.textContent = "…";
  item.append(asked, answered);
  $("conversation").append(item);
  return answered;
}

function chatMessages(question, image) {
  const earlier = $("with-context").checked ? state.turns : [];
  const messages = [];
  earlier.forEach((turn, index) => {
    messages.push(userMessage(turn.question, index === 0 ? image : null));
    messages.push({ role: "assistant", content: turn.answer });
  });
  messages.push(userMessage(question, earlier.length === 0 ? image : null));
  return messages;
}

function userMessage(text, image) {
  if (image === null) return { role: "user", content: text };
  return {
    role: "user",
    content: [
      { type: "text", text },
      { type: "image_url", image_url: { url: image } },
    ],
  };
}

// Server-sent events: `data: {chunk}` blocks, then `data: [DONE]`. Calls onText with each piece of text.
async function readStream(response, onText) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiProblem(500, chunk.error.type || "generation_failed", chunk.error.message);
        const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (piece) onText(piece);
      }
    }
  }
}

$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("question");
  const question = input.value.trim();
  showError($("ask-error"), null);
  if (!question) return;
  if (!state.file) {
    const why = state.refused ? "The server cannot read this file. Choose, drop or paste an image." : "Choose, drop or paste an image first.";
    showError($("ask-error"), new Error(why));
    return;
  }
  input.value = "";
  ask(question);
});

async function ask(question) {
  const signal = state.work.signal;
  const answer = addTurn(question);
  $("ask-button").disabled = true;
  try {
    const messages = chatMessages(question, await imageDataUri());
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages, stream: true }),
      signal,
    });
    let text = "";
    await readStream(response, (piece) => {
      text += piece; // shown as it arrives, token by token
      answer.textContent = text;
    });
    answer.textContent = text.trim() || "(no answer)";
    state.turns.push({ question, answer: text.trim() });
  } catch (error) {
    if (error.name === "AbortError") return;
    answer.textContent = "No answer.";
    showError($("ask-error"), error, () => {
      answer.parentElement.remove();
      ask(question);
    });
  } finally {
    answer.classList.remove("pending");
    $("ask-button").disabled = false;
  }
}

// -- gallery (needs a retrieval model and a gallery folder on the server) ---------------------------

const SEARCH_TOP_K = 8;
let thumbnails = []; // object URLs of the shown results, released when they are replaced

async function checkGallery() {
  const status = $("gallery-status");
  try {
    const info = await (await api("/gallery")).json();
    state.galleryReady = true;
    state.galleryCount = info.count;
    status.textContent = galleryLine();
  } catch (error) {
    state.galleryReady = false;
    if (error.status === 404) {
      $("gallery-panel").hidden = true; // a server without gallery routes
      return;
    }
    // 501: no retrieval model, or no gallery folder configured. The API's message says which and how
    // ("this server has no gallery; start it with --gallery-dir ..."): shown as the sentence it is.
    status.textContent = error.status === 501 ? sentence(error.message) : explain(error).join(" ");
  }
  enableGallery();
}

function sentence(text) {
  const trimmed = text.trim();
  return trimmed.charAt(0).toUpperCase() + trimmed.slice(1) + (/[.!?]$/.test(trimmed) ? "" : ".");
}

function enableGallery() {
  const ready = state.galleryReady;
  $("add-button").disabled = !(ready && state.file);
  $("like-button").disabled = !(ready && state.file);
  $("search-text").disabled = !ready;
  $("search-button").disabled = !ready;
}

function galleryLine() {
  const count = state.galleryCount;
  return `The gallery holds ${count === 1 ? "1 image" : `${count} images`}.`;
}

async function refreshCount() {
  const info = await (await api("/gallery")).json();
  state.galleryCount = info.count;
  $("gallery-status").textContent = galleryLine();
}

// A new image: what the gallery said about the previous one (added, removed, its results) goes.
function clearGalleryNews() {
  if (state.galleryReady) $("gallery-status").textContent = galleryLine();
  showError($("gallery-error"), null);
  showResults(null);
}

// Content-named ids are 32 hex digits: a phone's result tile would wrap them over lines. People see the
// file's name (from the metadata the page, `blip2-serve gallery add` or a manifest stored) or the id's
// start; the whole id is under the result's details.
function displayName(hit) {
  const metadata = hit.metadata || {};
  for (const key of ["name", "file_name", "filename", "path"]) {
    const value = metadata[key];
    if (typeof value === "string" && value.trim()) return value.trim().split("/").pop();
  }
  return shortId(hit.id);
}

function shortId(id) {
  return id.length > 12 ? `${id.slice(0, 8)}…` : id;
}

$("add-button").addEventListener("click", () => addToGallery(state.file));

async function addToGallery(file) {
  const button = $("add-button");
  const error = $("gallery-error");
  const name = file.name || "pasted image";
  showError(error, null);
  button.disabled = true;
  $("gallery-status").textContent = "Adding the image…";
  const form = new FormData();
  form.append("images", file, file.name || "pasted.png");
  form.append("metadata", JSON.stringify({ name }));
  try {
    const answer = await (await api("/gallery/images", { method: "POST", body: form })).json();
    const added = answer.images[0];
    await refreshCount();
    const how = { added: "Added", exists: "Already there", duplicate: "Already there (the same image)" }[added.status];
    if (how) {
      $("gallery-status").textContent += ` ${how}: ${name} (id ${shortId(added.id)}).`;
    } else {
      // `rejected`, with its reason (an add answers per image; one image alone that is refused fails the
      // request instead, and lands below)
      $("gallery-status").textContent += ` ${name} was not added.`;
      showError(error, new Error(added.error ? added.error.message : `status ${added.status}`));
    }
  } catch (problem) {
    $("gallery-status").textContent = "The image was not added.";
    showError(error, problem, () => addToGallery(file));
  } finally {
    button.disabled = !(state.galleryReady && state.file);
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("search-text").value.trim();
  if (text) search({ text }, `“${text}”`);
});

$("like-button").addEventListener("click", () => search({ file: state.file }, "images like this one"));

// A text query goes as JSON; an image query as a multipart upload (the file as chosen).
async function search(query, what) {
  const error = $("gallery-error");
  const results = $("results");
  showError(error, null);
  results.setAttribute("aria-busy", "true");
  $("results-heading").textContent = `Searching for ${what}…`;
  try {
    let response;
    if (query.file) {
      const form = new FormData();
      form.append("image", query.file, query.file.name || "pasted.png");
      form.append("top_k", String(SEARCH_TOP_K));
      response = await api("/gallery/search", { method: "POST", body: form });
    } else {
      response = await api("/gallery/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: query.text, top_k: SEARCH_TOP_K }),
      });
    }
    const answer = await response.json();
    showResults(answer.results, what);
  } catch (problem) {
    $("results-heading").textContent = "";
    showError(error, problem, () => search(query, what));
  } finally {
    results.removeAttribute("aria-busy");
  }
}

// The results as a numbered grid; null clears them.
function showResults(hits, what = "") {
  thumbnails.forEach((url) => URL.revokeObjectURL(url));
  thumbnails = [];
  state.resultsFor = what;
  $("results").replaceChildren(...(hits || []).map((hit) => resultItem(hit)));
  numberResults(hits !== null);
}

// Ranks and the heading follow the list as it is now (also after a removal).
function numberResults(searched) {
  const items = [...$("results").children];
  items.forEach((item, index) => {
    item.querySelector(".rank").textContent = `${index + 1}.`;
  });
  const what = state.resultsFor;
  const count = items.length === 1 ? "1 match" : `${items.length} best matches`;
  let heading = "";
  if (searched) heading = items.length ? `${count} for ${what}` : `Nothing in the gallery matches ${what}.`;
  $("results-heading").textContent = heading;
}

function resultItem(hit) {
  const name = displayName(hit);
  const item = document.createElement("li");
  item.dataset.id = hit.id;
  const image = document.createElement("img");
  image.alt = name;
  image.width = 128;
  image.height = 128;
  thumbnail(hit.id, image);
  const title = document.createElement("p");
  title.className = "name";
  const rank = document.createElement("strong");
  rank.className = "rank";
  title.append(rank, ` ${name}`);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "quiet";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove ${name} from the gallery`);
  remove.addEventListener("click", () => removeFromGallery(hit.id, name, item));
  item.append(image, title, ...scoreParts(hit), remove);
  return item;
}

// `relevance` is shown: one number that orders every result, higher is better (the API's own: 1 to 2 for
// results re-ranked by image-text matching, the similarity, -1 to 1, for the rest). Three decimals, as the
// re-ranked often differ in the third. The scores it comes from and the whole id are behind a toggle.
// From a server that sends no relevance: the scores themselves.
function scoreParts(hit) {
  const shown = document.createElement("p");
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  if (typeof hit.relevance === "number") {
    shown.className = "relevance";
    shown.textContent = `relevance ${hit.relevance.toFixed(3)}`;
    summary.textContent = "Scores and id";
    const how = typeof hit.score === "number" ? "ITM re-ranked" : "not re-ranked";
    details.append(summary, line(how), ...scoreLines(hit), line(`id ${hit.id}`));
  } else {
    shown.className = "scores";
    shown.append(...scoreLines(hit));
    summary.textContent = "Id";
    details.append(summary, line(hit.id));
  }
  return [shown, details];
}

// One line each: `score` (ITM logit + ITC: LAVIS's ranking of re-ranked results), the ITM match probability,
// the ITC cosine (max over the image's query vectors). An image query has ITC alone.
function scoreLines(hit) {
  const lines = [];
  if (typeof hit.score === "number") lines.push(`score ${hit.score.toFixed(2)}`);
  if (typeof hit.itm_score === "number") lines.push(`match ${Math.round(hit.itm_score * 100)}%`);
  if (typeof hit.itc_score === "number") lines.push(`ITC ${hit.itc_score.toFixed(3)}`);
  return lines.map((text) => line(text));
}

function line(text) {
  const span = document.createElement("span");
  span.textContent = text;
  return span;
}

// The stored image through the API (with the key, so not as a plain <img src>), shown from a blob: URL.
async function thumbnail(id, image) {
  try {
    const blob = await (await api(`/gallery/images/${encodeURIComponent(id)}/file`)).blob();
    const url = URL.createObjectURL(blob);
    thumbnails.push(url);
    image.addEventListener("load", () => sharpIfSmall(image));
    image.src = url;
  } catch {
    image.alt = `${image.alt} (no preview)`;
  }
}

// Deleting cannot be undone, so the person confirms first.
async function removeFromGallery(id, name, item) {
  const error = $("gallery-error");
  showError(error, null);
  if (!window.confirm(`Remove ${name} from the gallery? This cannot be undone.`)) return;
  try {
    await api(`/gallery/images/${encodeURIComponent(id)}`, { method: "DELETE" });
    const next = item.nextElementSibling || item.previousElementSibling;
    item.remove();
    numberResults(true);
    if (next) next.querySelector("button").focus();
    else $("search-text").focus();
    await refreshCount();
    $("gallery-status").textContent += ` Removed ${name}.`;
  } catch (problem) {
    showError(error, problem);
  }
}

connect();
