// The page of xar-serve: asks /v1/generate/stream for one image and shows each cell as it arrives.
// Plain JavaScript, no libraries: the page works offline, served by the package itself.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function classInput(info) {
  const slot = $("class-slot");
  if (info.class_names) {
    // ImageNet: a search box over the 1000 names; the browser filters the list as one types.
    const input = document.createElement("input");
    input.id = "class";
    input.setAttribute("list", "class-names");
    input.placeholder = "type to search, e.g. golden retriever";
    input.value = "207 golden retriever, golden retriever";
    const list = document.createElement("datalist");
    list.id = "class-names";
    info.class_names.forEach((names, id) => {
      const option = document.createElement("option");
      option.value = `${id} ${names}`;
      list.appendChild(option);
    });
    slot.append(input, list);
  } else {
    const select = document.createElement("select");
    select.id = "class";
    for (let id = 0; id < info.num_classes; id++) {
      select.appendChild(new Option(String(id), String(id)));
    }
    select.value = String(Math.min(7, info.num_classes - 1));
    slot.appendChild(select);
  }
}

function classLabel() {
  const text = $("class").value.trim();
  const id = text.match(/^(\d+)(\s|$)/);  // "207 golden retriever, ..." from the list, or a bare id
  return id ? Number(id[1]) : text;       // otherwise a name, which the server looks up
}

function showStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function parseEvent(chunk) {
  let event = "message", data = "";
  for (const line of chunk.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  return { event, data: data ? JSON.parse(data) : null };
}

function onEvent({ event, data }, started) {
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  if (event === "cell") {
    $("image").src = "data:image/png;base64," + data.png;
    $("image").dataset.state = "cell";
    const item = document.createElement("li");
    item.className = "cell";
    item.textContent = `cell ${data.index + 1} of ${model.num_cells} after ${seconds} s`;
    $("cells").appendChild(item);
  } else if (event === "done") {
    $("image").src = "data:image/png;base64," + data.png;
    $("image").dataset.state = "done";
    showStatus(`Done in ${seconds} s (the server took ${data.seconds.toFixed(2)} s), seed ${data.seed}.`);
  } else if (event === "error") {
    showStatus(data.error, true);
  }
}

async function generate(submitEvent) {
  submitEvent.preventDefault();
  const body = { class_label: classLabel(), output: "png" };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("steps").value !== "") body.num_inference_steps = Number($("steps").value);
  $("cells").replaceChildren();
  $("image").removeAttribute("src");
  $("image").dataset.state = "waiting";
  $("generate").disabled = true;
  showStatus("Generating...");
  const started = performance.now();
  try {
    const response = await fetch("/v1/generate/stream", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) {
      const answer = await response.json().catch(() => ({ error: response.statusText }));
      showStatus(`${response.status}: ${answer.error}`, true);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {  // events end with a blank line
        onEvent(parseEvent(buffer.slice(0, end)), started);
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (error) {
    showStatus(`The connection failed: ${error}`, true);
  } finally {
    $("generate").disabled = false;
  }
}

async function start() {
  model = await (await fetch("/v1/model")).json();
  const size = model.image_size ? `${model.image_size[0]}x${model.image_size[1]} images` : "latents only";
  $("model").textContent = `${model.model || "model"}: ${model.num_classes} classes, ${size} in ` +
    `${model.num_cells} cells, ${model.batching} batching.`;
  classInput(model);
  $("steps").value = model.default_steps;
  $("form").addEventListener("submit", generate);
}

start().catch((error) => showStatus(`Cannot reach the server: ${error}`, true));
