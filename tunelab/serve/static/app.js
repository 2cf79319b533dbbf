// The chat page of `tunelab serve`: plain JavaScript, no build step, nothing fetched from elsewhere.
// It talks to the same OpenAI-compatible API as any client: GET /v1/models, POST /v1/chat/completions
// with stream: true, reading the server-sent events as they arrive.
"use strict";
const $ = (sel) => document.querySelector(sel);
const state = { history: [], controller: null, model: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text) { $("#status").textContent = text || ""; }

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#stop").disabled = !busy;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;  // textContent, never innerHTML: model output is not trusted markup
  div.append(label, content);
  $("#messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || res.statusText;
  } catch (e) {
    return res.status + " " + res.statusText;
  }
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) {
      setStatus(await errorMessage(res));
      if (res.status === 401) {  // the server wants a key: show where it goes
        $("#settings").open = true;
        $("#api-key").focus();
      }
      return false;
    }
    state.model = (await res.json()).data[0].id;
    $("#model").textContent = state.model;
    setStatus("");
    return true;
  } catch (e) {
    setStatus("cannot reach the server: " + e.message);
    return false;
  }
}

// Split a growing text buffer into complete server-sent events; returns [events, rest].
function takeEvents(buffer) {
  const events = [];
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    events.push(buffer.slice(0, cut));
    buffer = buffer.slice(cut + 2);
  }
  return [events, buffer];
}

async function send() {
  const text = $("#input").value.trim();
  if (!text || state.controller) return;
  if (!state.model && !(await loadModel())) return;
  $("#input").value = "";
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const content = bubble.querySelector(".content");
  bubble.classList.add("streaming");
  const messages = [];
  const system = $("#system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  const body = { model: state.model, messages, stream: true,
                 temperature: Number($("#temperature").value || 0),
                 max_tokens: Number($("#max-tokens").value || 256) };
  state.controller = new AbortController();
  setBusy(true);
  setStatus("");
  let answer = "";
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: state.controller.signal });
    if (!res.ok) throw new Error(await errorMessage(res));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let events;
      [events, buffer] = takeEvents(buffer + decoder.decode(value, { stream: true }));
      for (const event of events) {
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          const delta = obj.choices && obj.choices[0] && obj.choices[0].delta.content;
          if (delta) {
            answer += delta;
            content.textContent = answer;
            bubble.scrollIntoView({ block: "end" });
          }
        }
      }
    }
    bubble.classList.add("done");
  } catch (e) {
    if (e.name === "AbortError") {
      bubble.classList.add("stopped");
    } else {
      bubble.classList.add("error");
      content.textContent = answer || "(no answer)";
      setStatus(e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
  // Keep the exchange (a stopped answer as far as it got) so the next question sees the conversation.
  if (!bubble.classList.contains("error")) {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  }
}

$("#composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("#input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("#stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("#clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("#messages").replaceChildren();
  setStatus("");
});
$("#api-key").addEventListener("change", loadModel);
loadModel();
