// The chat page of stage=serve: plain JavaScript over the server's own OpenAI API, no build step.
// The conversation lives in this page only; each request sends all of it (the server keeps no state).
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model-name"), transcript: $("transcript"), error: $("error"), form: $("ask"),
  question: $("question"), send: $("send"), stop: $("stop"), clear: $("clear"),
  system: $("system"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
  seed: $("seed"), apiKey: $("api-key"), settings: $("settings"),
};

let history = [];      // {role, content} of the finished turns, in order
let modelId = null;    // from GET /v1/models; requests name it
let running = null;    // the AbortController of the answer being streamed

class ServerError extends Error {
  constructor(message, status = 0) { super(message); this.status = status; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// An OpenAI-style error body ({"error": {"message", ...}}) as one line; anything else as its status.
async function errorOf(response) {
  let message = "";
  try {
    const body = await response.json();
    message = (body && body.error && body.error.message) || "";
  } catch (_) { /* not JSON */ }
  return new ServerError(`${response.status} ${response.statusText}${message ? ": " + message : ""}`, response.status);
}

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = !text;
}

function showServerError(e) {
  if (e.status === 401) {
    ui.settings.open = true;  // where the key goes
    showError(e.message + " — enter the API key in Settings.");
  } else {
    showError(e.message);
  }
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) {
      ui.model.textContent = "unknown";
      showServerError(await errorOf(response));
      return;
    }
    const body = await response.json();
    modelId = body.data[0].id;
    ui.model.textContent = modelId;
    showError("");
  } catch (e) {
    ui.model.textContent = "unknown";
    showError("cannot reach the server: " + e.message);
  }
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Model";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;  // text, never HTML: the model's output is not trusted markup
  item.append(who, content);
  ui.transcript.append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function note(item, text) {
  const small = document.createElement("span");
  small.className = "note";
  small.textContent = text;
  item.append(small);
}

function number(input, name, parse) {
  const value = parse(input.value);
  if (input.value.trim() === "" || Number.isNaN(value)) throw new ServerError(`${name}: not a number`);
  return value;
}

function requestBody() {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = {
    messages: messages.concat(history),
    stream: true,
    temperature: number(ui.temperature, "Temperature", parseFloat),
    top_p: number(ui.topP, "Top p", parseFloat),
    max_tokens: number(ui.maxTokens, "Max tokens", (v) => parseInt(v, 10)),
  };
  if (modelId) body.model = modelId;
  if (ui.seed.value.trim() !== "") body.seed = number(ui.seed, "Seed", (v) => parseInt(v, 10));
  return body;
}

// Server-sent events, read as they arrive: the decoder keeps a character split between network
// chunks for the next one, and an event is handled once its blank line has come.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : blocks.pop();
    for (const block of blocks) {
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
    if (done) return;
  }
}

async function streamAnswer(body, content, signal) {
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorOf(response);
  let finish = null;
  for await (const data of events(response)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ServerError(chunk.error.message || "the server failed");
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;
    if (choice.delta && choice.delta.content) content.textContent += choice.delta.content;
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  return finish;
}

function setRunning(controller) {
  running = controller;
  ui.send.disabled = Boolean(controller);
  ui.stop.disabled = !controller;
  ui.clear.disabled = Boolean(controller);
  ui.transcript.setAttribute("aria-busy", controller ? "true" : "false");
}

async function ask(question) {
  showError("");
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(e.message);
    return;
  }
  body.messages.push({ role: "user", content: question });
  const asked = addMessage("user", question);
  const answer = addMessage("assistant", "");
  const content = answer.querySelector(".content");
  answer.classList.add("streaming");
  const controller = new AbortController();
  setRunning(controller);
  ui.question.value = "";
  try {
    const finish = await streamAnswer(body, content, controller.signal);
    if (finish === "length") note(answer, "(max tokens reached)");
    else if (!content.textContent) note(answer, "(no text: the model ended its turn at once)");
    history.push({ role: "user", content: question }, { role: "assistant", content: content.textContent });
  } catch (e) {
    if (e.name === "AbortError") {
      // What came before Stop stays in the conversation, as the model's answer.
      note(answer, "(stopped)");
      history.push({ role: "user", content: question }, { role: "assistant", content: content.textContent });
    } else {
      // The turn did not happen: take it out and give the question back to edit or resend.
      asked.remove();
      answer.remove();
      ui.question.value = question;
      if (e instanceof ServerError) showServerError(e);
      else showError("the request failed: " + e.message);
    }
  } finally {
    answer.classList.remove("streaming");
    setRunning(null);
    ui.question.focus();
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = ui.question.value.trim();
  if (question && !running) ask(question);
});

ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => running && running.abort());

ui.clear.addEventListener("click", () => {
  history = [];
  ui.transcript.replaceChildren();
  showError("");
  ui.question.focus();
});

ui.apiKey.addEventListener("change", loadModel);

loadModel();
