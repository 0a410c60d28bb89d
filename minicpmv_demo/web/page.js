// The page's browser side (loaded in the page's <head>; the Python side is web/page_events.py).
// - question ids: each question sent gets a new random id that Stop names;
// - saved chats: the chats and settings this browser keeps (Gradio's BrowserState), the list of
//   past chats, New chat;
// - the row of actions under a reply: copy here, the rest by pressing the page's hidden buttons
//   or Gradio's own like and dislike of that reply;
// - files: refused here before they are sent when too large or of a kind the model cannot read,
//   with the page's one notice style (the server checks every file again when it arrives);
// - a picture in the chat opens full size on click; the message box keeps the focus.
(() => {
  const config = window.minicpmvConfig || {};
  const MAX_SAVED_CHATS = 30;
  const MAX_SAVED_CHARS = 1500000; // localStorage holds about 5 MB per site, encrypted text is larger
  const page = {};
  let pendingNotice = "";

  page.newId = () => {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes); // unlike crypto.randomUUID, also on plain http
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  };

  // An event's `js=`: its inputs, with the last one (the question id) replaced by a new id.
  page.withNewId = (...inputs) => {
    inputs[inputs.length - 1] = page.newId();
    return inputs;
  };

  page.focusBox = () => {
    const box = document.querySelector("#chat-input textarea");
    if (box) box.focus();
    return [];
  };

  // After the page has loaded (given the settings): the summary line, the focus in the box, and
  // a word in the empty past-chats list (Gradio's dropdown has no placeholder of its own).
  page.loaded = (settings) => {
    const list = document.querySelector("#past-chats input");
    if (list) list.placeholder = "Past chats (kept in this browser)";
    page.ready = true; // the saved chat is restored: what the visitor does now is not overwritten
    page.focusBox();
    return [page.settingsSummary(settings)];
  };

  // ---- saved chats: {current, chats: [{id, title, messages}], settings} --------------------
  const copyOf = (value) => JSON.parse(JSON.stringify(value ?? null));
  const normalised = (saved) => {
    const value = copyOf(saved) || {};
    return {current: value.current || null, chats: Array.isArray(value.chats) ? value.chats : [],
            settings: Array.isArray(value.settings) ? value.settings : null};
  };
  const textOf = (message) => {
    const content = message && message.content;
    if (typeof content === "string") return content;
    const parts = Array.isArray(content) ? content : [content];
    return parts.map((part) => (part && typeof part.text === "string" ? part.text : "")).join(" ");
  };
  const titleOf = (messages) => {
    const first = (messages || []).find((m) => m && m.role === "user" && textOf(m).trim());
    const text = first ? textOf(first).trim().replace(/\s+/g, " ") : "Pictures";
    return text.length > 60 ? text.slice(0, 57) + "…" : text;
  };
  const trimmed = (saved) => {
    saved.chats = saved.chats.slice(0, MAX_SAVED_CHATS);
    while (saved.chats.length > 1 && JSON.stringify(saved).length > MAX_SAVED_CHARS) saved.chats.pop();
    return saved;
  };

  page.saveChat = (saved, chat) => {
    saved = normalised(saved);
    const messages = copyOf(chat) || [];
    let current = saved.chats.find((c) => c.id === saved.current);
    if (!current && messages.length) {
      current = {id: page.newId(), title: "", messages: []};
      saved.current = current.id;
    }
    if (current && !messages.length) { // emptied (the question was refused, or undone): not a past chat
      saved.chats = saved.chats.filter((c) => c.id !== current.id);
      saved.current = null;
    } else if (current) {
      current.messages = messages;
      current.title = titleOf(messages);
      saved.chats = [current, ...saved.chats.filter((c) => c.id !== current.id)];
    }
    return [trimmed(saved)];
  };

  // A settings change: the summary line under the box, and the settings kept in the browser.
  page.settingsChanged = (saved, values) => {
    saved = normalised(saved);
    saved.settings = copyOf(values);
    return [page.settingsSummary(values), saved];
  };

  // What the server restores on load: the current chat's messages and the settings.
  page.current = (saved) => {
    saved = normalised(saved);
    const current = saved.chats.find((c) => c.id === saved.current);
    return {messages: current ? current.messages : [], settings: saved.settings};
  };

  page.titles = (saved) => {
    saved = normalised(saved);
    return {current: saved.current, chats: saved.chats.map((c) => [c.title || "Chat", c.id])};
  };

  page.chatFor = (saved, id) => {
    const chat = normalised(saved).chats.find((c) => c.id === id);
    return {messages: chat ? chat.messages : []};
  };

  page.select = (saved, id) => {
    saved = normalised(saved);
    if (saved.chats.some((c) => c.id === id)) saved.current = id;
    return [saved];
  };

  const answering = () => !!document.querySelector("#chat-input button[aria-label='Stop']");

  // New chat: the chat shown stays among the past chats; the new one is saved once it has a question.
  // Not while an answer streams: it would draw into the new chat.
  page.newChat = (saved, chat) => {
    if (answering()) return [saved, chat];
    saved = normalised(saved);
    saved.current = null;
    return [saved, []];
  };

  // ---- the settings' summary line ------------------------------------------------------------
  // Made here rather than on the server so that it follows every change at once and in order:
  // the answers to a burst of server calls (the restore on load sets ten settings) can arrive out
  // of order and leave the line showing a value the settings no longer have.
  const shortNumber = (x) => String(Number(Number(x).toPrecision(6))); // 0.3, not 0.30000000000000004
  page.settingsSummary = ([maxNew, temperature, topP, topK, penalty, thinking, fine, slices, frames]) => {
    const parts = [`up to ${Math.trunc(maxNew)} new tokens`,
                   temperature ? `temperature ${shortNumber(temperature)} · top-p ${shortNumber(topP)}` : "greedy"];
    if (temperature && topK) parts.push(`top-k ${Math.trunc(topK)}`);
    if (penalty && penalty !== 1) parts.push(`repetition penalty ${shortNumber(penalty)}`);
    parts.push(thinking ? "thinking on" : "thinking off", fine ? "fine detail" : "normal detail",
               `${Math.trunc(slices)} slices`, `${Math.trunc(frames)} video frames`);
    return "Settings: " + parts.join(" · ");
  };

  // ---- notices the page finds itself, shown like every other notice --------------------------
  page.notify = (text) => {
    pendingNotice = text;
    const button = document.getElementById("page-notice");
    if (button) button.click();
  };
  page.takeNotice = () => {
    const text = pendingNotice;
    pendingNotice = "";
    return text;
  };

  // ---- the row under a reply ----------------------------------------------------------------
  const answerText = (row) =>
    Array.from(row.querySelectorAll("[data-testid='bot'] > .message-content"))
      .filter((el) => !el.querySelector(".reply-foot, .reply-waiting"))
      .map((el) => el.innerText.trim()).filter(Boolean).join("\n\n");

  const copy = async (text) => {
    try {
      await navigator.clipboard.writeText(text);
    } catch (error) { // no clipboard API (plain http on another host): the old way
      const area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
  };

  const act = (button) => {
    const action = Array.from(button.classList).find((c) => c.startsWith("act-")).slice(4);
    const row = button.closest(".message-row");
    if (action === "copy") {
      copy(answerText(row)).then(() => {
        button.classList.add("done");
        setTimeout(() => button.classList.remove("done"), 1500);
      });
    } else if (action === "like" || action === "dislike") {
      // Gradio's own rating of this reply (hidden): it sends the reply, whose foot names its id.
      const panel = row.nextElementSibling;
      const label = action === "like" ? "Like" : "Dislike";
      const rating = panel && panel.querySelector(`button[aria-label='${label}']`);
      if (rating) rating.click();
      const pressed = !button.classList.contains("pressed");
      row.querySelectorAll(".act-like, .act-dislike").forEach((b) => b.classList.remove("pressed"));
      button.classList.toggle("pressed", pressed);
    } else {
      const hidden = document.getElementById(`${action}-question`);
      if (hidden) hidden.click();
    }
  };

  // ---- files: refused before they are sent when the server would refuse them anyway ---------
  const isVideo = (file) => /\.(mp4|webm|mov)$/i.test(file.name);
  const refusal = (file) => {
    const megabytes = (bytes) => (bytes / 1048576).toPrecision(3).replace(/\.?0+$/, "");
    const video = isVideo(file);
    if (!video && !(file.type || "").startsWith("image/"))
      return `${file.name} was not added: attach pictures or a video (MP4, WebM, MOV).`;
    const limit = video ? config.maxVideoMb : config.maxFileMb;
    if (limit && file.size > limit * 1048576)
      return `${file.name} was not added: it is ${megabytes(file.size)} MB; the limit for ` +
             `${video ? "videos" : "pictures"} is ${limit} MB.`;
    return null;
  };

  const filterFiles = (input) => {
    const attached = document.querySelectorAll("#chat-input .thumbnail-item").length;
    const kept = new DataTransfer();
    const notices = [];
    for (const file of input.files) {
      const reason = refusal(file) ||
        (attached + kept.files.length >= config.maxImages
          ? `${file.name} was not added: a message takes up to ${config.maxImages} files.` : null);
      if (reason) notices.push(reason);
      else kept.items.add(file);
    }
    if (notices.length) {
      input.files = kept.files;
      page.notify(notices.join(" "));
    }
    return kept.files.length;
  };

  // The capture phase runs before Gradio's own handlers: they only ever see the accepted files.
  document.addEventListener("change", (event) => {
    const input = event.target;
    if (!(input instanceof HTMLInputElement) || !input.matches("#chat-input input[type=file]")) return;
    if (filterFiles(input) === 0) event.stopImmediatePropagation();
  }, true);

  // A drop goes the same way: through the box's file input, filtered.
  document.addEventListener("drop", (event) => {
    const box = event.target instanceof Element && event.target.closest("#chat-input");
    const input = box && box.querySelector("input[type=file]");
    if (!input || !event.dataTransfer || !event.dataTransfer.files.length) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    input.files = event.dataTransfer.files;
    input.dispatchEvent(new Event("change", {bubbles: true}));
  }, true);

  // ---- a picture in the chat opens full size; Escape or a click closes it -------------------
  const openPicture = (image) => {
    const viewer = document.createElement("div");
    viewer.id = "picture-viewer";
    viewer.setAttribute("role", "dialog");
    viewer.setAttribute("aria-label", "Picture, full size (click or Escape to close)");
    const big = document.createElement("img");
    big.src = image.src;
    big.alt = image.alt || "";
    viewer.appendChild(big);
    const close = () => {
      viewer.remove();
      document.removeEventListener("keydown", onKey, true);
    };
    const onKey = (event) => { if (event.key === "Escape") close(); };
    viewer.addEventListener("click", close);
    document.addEventListener("keydown", onKey, true);
    document.body.appendChild(viewer);
  };

  document.addEventListener("click", (event) => {
    const target = event.target instanceof Element ? event.target : null;
    const action = target && target.closest("#chatbot .reply-action");
    if (action) {
      event.preventDefault();
      event.stopPropagation();
      act(action);
      return;
    }
    const picture = target && target.closest("#chatbot .user-row .image-frame");
    if (picture && picture.querySelector("img")) {
      event.preventDefault();
      event.stopPropagation();
      openPicture(picture.querySelector("img"));
    }
  }, true);

  window.minicpmv = page;
})();
