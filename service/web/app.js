// The page's one script. It calls the server's public API only (the routes, errors and API key a curl
// user has): /caption with the chosen file, /v1/chat/completions streamed token by token for questions,
// and the gallery routes when the server has a retrieval model. No library, no build step.

const $ = (id) => document.getElementById(id);

const state = {
  key: null, // the API key the person typed: in this tab's memory only, never stored
  file: null, // the chosen image, as the browser holds it
  dataUri: null, // the same bytes as a data: URI, for the chat route's image_url part
  previewUrl: null,
  turns: [], // [{question, answer}] about the current image
  work: new AbortController(), // aborts what is in flight for the previous image
  galleryReady: false,
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
  state.dataUri = null;
  state.turns = [];
  $("conversation").replaceChildren();
  showError($("image-error"), null);
  showError($("ask-error"), null);

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
    showError($("image-error"), error, () => caption(file, signal));
  } finally {
    if (!signal.aborted) target.classList.remove("pending");
  }
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
    showError($("ask-error"), new Error("Choose, drop or paste an image first."));
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
    status.textContent = galleryLine(info.count);
  } catch (error) {
    state.galleryReady = false;
    if (error.status === 404) {
      $("gallery-panel").hidden = true; // a server without gallery routes
      return;
    }
    // 501: no retrieval model, or no gallery folder configured; the API's message says which.
    status.textContent = error.status === 501 ? `No gallery on this server: ${error.message}.` : explain(error).join(" ");
  }
  enableGallery();
}

function enableGallery() {
  const ready = state.galleryReady;
  $("add-button").disabled = !(ready && state.file);
  $("like-button").disabled = !(ready && state.file);
  $("search-text").disabled = !ready;
  $("search-button").disabled = !ready;
}

function galleryLine(count) {
  return `The gallery holds ${count === 1 ? "1 image" : `${count} images`}.`;
}

async function refreshCount() {
  const info = await (await api("/gallery")).json();
  $("gallery-status").textContent = galleryLine(info.count);
}

$("add-button").addEventListener("click", () => addToGallery(state.file));

async function addToGallery(file) {
  const button = $("add-button");
  const error = $("gallery-error");
  showError(error, null);
  button.disabled = true;
  $("gallery-status").textContent = "Adding the image…";
  const form = new FormData();
  form.append("images", file, file.name || "pasted.png");
  form.append("metadata", JSON.stringify({ name: file.name || "pasted image" }));
  try {
    const answer = await (await api("/gallery/images", { method: "POST", body: form })).json();
    const added = answer.images[0];
    await refreshCount();
    const how = { added: "Added", exists: "Already there", duplicate: "Already there (the same image)" }[added.status];
    $("gallery-status").textContent += ` ${how}: ${file.name || "the image"} as ${added.id}.`;
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

function showResults(hits, what) {
  thumbnails.forEach((url) => URL.revokeObjectURL(url));
  thumbnails = [];
  const count = hits.length === 1 ? "1 match" : `${hits.length} best matches`;
  $("results-heading").textContent = hits.length ? `${count} for ${what}` : `Nothing in the gallery matches ${what}.`;
  $("results").replaceChildren(...hits.map((hit, index) => resultItem(hit, index + 1)));
}

function resultItem(hit, rank) {
  const name = (hit.metadata && typeof hit.metadata.name === "string" && hit.metadata.name) || hit.id;
  const item = document.createElement("li");
  item.dataset.id = hit.id;
  const image = document.createElement("img");
  image.alt = name;
  image.width = 128;
  image.height = 128;
  thumbnail(hit.id, image);
  const title = document.createElement("p");
  title.className = "name";
  const strong = document.createElement("strong");
  strong.textContent = `${rank}.`;
  title.append(strong, ` ${name}`);
  const scores = document.createElement("p");
  scores.className = "scores";
  scores.append(...scoreLines(hit));
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "quiet";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove ${name} from the gallery`);
  remove.addEventListener("click", () => removeFromGallery(hit.id, item));
  item.append(image, title, scores, remove);
  return item;
}

// One line each: `score` (ITM logit + ITC: the ranking of re-ranked results), the ITM match probability,
// the ITC cosine (max over the image's query vectors). An image query has ITC alone.
function scoreLines(hit) {
  const lines = [];
  if (typeof hit.score === "number") lines.push(`score ${hit.score.toFixed(2)}`);
  if (typeof hit.itm_score === "number") lines.push(`match ${Math.round(hit.itm_score * 100)}%`);
  lines.push(`ITC ${hit.itc_score.toFixed(3)}`);
  return lines.map((line) => {
    const span = document.createElement("span");
    span.textContent = line;
    return span;
  });
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

async function removeFromGallery(id, item) {
  const error = $("gallery-error");
  showError(error, null);
  try {
    await api(`/gallery/images/${encodeURIComponent(id)}`, { method: "DELETE" });
    const next = item.nextElementSibling || item.previousElementSibling;
    item.remove();
    if (next) next.querySelector("button").focus();
    else $("search-text").focus();
    await refreshCount();
    $("gallery-status").textContent += ` Removed ${id}.`;
  } catch (problem) {
    showError(error, problem);
  }
}

connect();
