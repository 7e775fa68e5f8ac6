"""The page's own script (``demo.launch(head=HEAD)``): what Gradio's components do not do.

- Each tab keeps its own chat through a reload. Gradio's ``BrowserState`` keeps one value per
  key in ``localStorage``, which every tab of a browser shares: two tabs overwrote each other's
  saved chat, and a reload showed the other tab's. The chat's key (``phi3v-chat``) is read and
  written per tab instead, under ``phi3v-chat:<tab>``, the tab's id kept in ``sessionStorage``
  (a reload keeps it, another tab has its own). A new tab opens the chat saved last, if the
  tab that saved it has closed (each open tab notes every 2 s that it is open); else it starts
  empty. A duplicated tab starts with a copy of its original's chat. The chats of the 20 tabs
  that saved last are kept.
- Esc stops the answer (as in other chat apps); the Stop button does the work.
- A pasted file that is not a picture would vanish without a word (Gradio drops it; a dropped
  one gets a toast): the status line says so instead, until the server writes it next. So does
  a file over the upload limit, which Gradio refuses with a pop-up only, leaving the line as it
  was; the pictures chosen with it, which Gradio refuses too, are named as well.
- Every control gets a unique name a screen reader can say: Gradio's are the same for every
  message ("Copy message", "Edit"), twice "Submit" while editing, five "Reset to default value"
  sliders and an unnamed edit box. A picture in a message, a button with no name, is named by
  its file.
- Keyboard use keeps its place: when Stop, Undo or Retry locks or removes the focused control,
  focus returns to the input once it can be typed in (not after a touch: a phone's keyboard
  would cover the answer).
- A disabled control says why in its tooltip (its ``title``), from the page's state: an answer
  on its way (Stop is enabled), the model still loading or not available (the model box).
- An empty chat shows its instructions and the first example from the top: Gradio scrolls the
  chat to its end as it renders, which on a phone hid both. Until the visitor scrolls or touches
  the page, an empty chat is kept at its top; a chat with messages is left to Gradio.
- The example cards say how long their first words take on this machine: the server writes
  the texts into a hidden element (:func:`phi3v_app.view.example_times`), copied onto the cards
  here (Gradio's example cards cannot be re-rendered with new text).

All of it runs again whenever Gradio re-renders (a MutationObserver, once per frame at most),
and writes only what changed, so it never triggers itself.
"""

from phi3v_app.history import MAX_UPLOAD_BYTES

_HEAD = """
<script>
// Before Gradio reads its BrowserState: the chat's key, per tab (see the module's docstring).
(() => {
  if (window.phi3vChatPerTab) return;  // Gradio may apply the head twice
  window.phi3vChatPerTab = true;
  const KEY = "phi3v-chat", SAVED = "phi3v-chat-saved", SEEN = "phi3v-tab-seen:";
  const KEPT = 20, BEAT_MS = 2000, GONE_MS = 6000;
  const storage = Storage.prototype;
  const get = storage.getItem, set = storage.setItem, remove = storage.removeItem;
  const local = (method, ...args) => method.call(localStorage, ...args);
  const isOpen = (id) => Date.now() - Number(local(get, SEEN + id) || 0) < GONE_MS;
  const savedTimes = () => {
    try { return JSON.parse(local(get, SAVED)) || {}; } catch (error) { return {}; }
  };
  for (let n = localStorage.length - 1; n >= 0; n--) {  // tabs that ended without a word
    const key = localStorage.key(n);
    if (key?.startsWith(SEEN) && !isOpen(key.slice(SEEN.length))) local(remove, key);
  }
  let tab = sessionStorage.getItem("phi3v-tab");
  let copied = null;  // a duplicated tab (same id, its original still open) starts with a copy
  if (tab && isOpen(tab)) {
    copied = local(get, `${KEY}:${tab}`);
    tab = null;
  }
  if (!tab) {
    tab = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    sessionStorage.setItem("phi3v-tab", tab);
  }
  const beat = () => local(set, SEEN + tab, String(Date.now()));
  beat();
  setInterval(beat, BEAT_MS);
  addEventListener("pagehide", () => local(remove, SEEN + tab));  // closed, or reloading
  storage.getItem = function (key) {
    if (this !== localStorage || key !== KEY) return get.call(this, key);
    const own = get.call(this, `${KEY}:${tab}`);
    if (own !== null || copied !== null) return own ?? copied;
    // A new tab: the chat saved last, unless the tab that saved it is still open.
    const times = savedTimes();
    const last = Object.keys(times).sort((a, b) => times[b] - times[a])[0];
    return last && !isOpen(last) ? get.call(this, KEY) : null;
  };
  storage.setItem = function (key, value) {
    if (this !== localStorage || key !== KEY) return set.call(this, key, value);
    set.call(this, `${KEY}:${tab}`, value);
    set.call(this, KEY, value);  // the chat saved last, for a new tab once this one closes
    const times = savedTimes();
    times[tab] = Date.now();
    for (const old of Object.keys(times).sort((a, b) => times[b] - times[a]).slice(KEPT)) {
      remove.call(this, `${KEY}:${old}`);
      delete times[old];
    }
    set.call(this, SAVED, JSON.stringify(times));
  };
})();
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  const stop = document.querySelector("#stop");
  if (stop && !stop.disabled) { event.preventDefault(); stop.click(); }
});
// A note of the page's own in the status line. Gradio's nodes stay (replaced, the line would
// never update again): the note hides them until Gradio writes the line next.
function showStatus(kind, text) {
  const block = document.querySelector("#status");
  const line = block?.querySelector(".html-container");
  if (!line) return;
  block.querySelector(".page-note")?.remove();
  const note = document.createElement("div");
  note.className = `status ${kind} page-note`;
  note.setAttribute("role", "status");
  note.textContent = text;
  block.append(note);
  block.classList.add("noted");
  const gone = new MutationObserver(() => {
    gone.disconnect(); note.remove(); block.classList.remove("noted");
  });
  gone.observe(line, {subtree: true, childList: true, characterData: true});
}
// A file over the upload limit never reaches the server: Gradio refuses it with a pop-up, and
// the status line would go on showing what it said before (a complaint about another file).
// Gradio refuses the pictures chosen or dropped with it too, so the line names them as well.
// While the input is locked Gradio takes no file at all, and the line keeps its own news.
function refuseTooLarge(files) {
  const all = [...(files || [])];
  const big = all.filter((file) => file.size > UPLOAD_LIMIT).map((file) => file.name);
  if (!big.length || document.querySelector("#chat-input textarea")?.disabled) return;
  const others = all.filter((file) => file.size <= UPLOAD_LIMIT).map((file) => file.name);
  const what = big.length > 1 ? "are larger" : "is larger";
  let text = `⚠ Not attached: ${big.join(", ")} ${what} than ` +
             `${UPLOAD_LIMIT / 1048576} MB, the most a picture may be; downscale it first.`;
  if (others.length)
    text += ` Not attached with ${big.length > 1 ? "them" : "it"} either: ` +
            `${others.join(", ")}; attach ${others.length > 1 ? "them" : "it"} again.`;
  showStatus("error", text);
}
document.addEventListener("change", (event) => {
  if (event.target.matches?.("#chat-input input[type=file]")) refuseTooLarge(event.target.files);
}, true);
document.addEventListener("drop", (event) => {
  if (event.target.closest?.("#chat-input")) refuseTooLarge(event.dataTransfer?.files);
}, true);
document.addEventListener("paste", (event) => {
  if (!event.target.closest || !event.target.closest("#chat-input")) return;
  const refused = [...(event.clipboardData?.files || [])]
    .filter((file) => !file.type.startsWith("image/")).map((file) => file.name);
  if (!refused.length) return;
  const what = refused.length > 1 ? "are not pictures" : "is not a picture";
  showStatus("error", `⚠ Not sent: ${refused.join(", ")} ${what}. ` +
                      "Only pictures (PNG, JPEG, WebP, GIF) can be attached.");
}, true);

const RENAMED = {"Submit": "Save the edit", "Cancel": "Cancel the edit"};
function rename(element, name) {
  if (element.getAttribute("aria-label") !== name) element.setAttribute("aria-label", name);
}
function explain(element, why) {
  const title = element.disabled ? why : "";
  if ((element.getAttribute("title") || "") !== title) element.setAttribute("title", title);
}
// Why the input and the chat's icons are locked: an answer, or the model.
function whyLocked() {
  const stop = document.querySelector("#stop");
  if (stop && !stop.disabled) return "Wait for the answer to finish, or press Stop (Esc)";
  const model = document.querySelector("#model-panel .model");
  if (model?.classList.contains("failed"))
    return "The model is not available: see the message above";
  if (model && !model.classList.contains("ready"))
    return "The model is still loading: the chat opens when it is ready";
  return "Wait for the answer to finish, or press Stop (Esc)";
}
function explainControls() {
  const stop = document.querySelector("#stop");
  if (stop) explain(stop, "Nothing to stop: no answer is running");
  const why = whyLocked();
  for (const control of document.querySelectorAll(
      "#chat-input textarea, #chat-input button, #chat .message-buttons button"))
    explain(control, why);
}
// A button's name as Gradio gave it; a picture in a message (a button around its image, with
// no name of its own) is named by its file.
function ownName(button) {
  const own = button.getAttribute("aria-label") || button.innerText.trim();
  const image = button.querySelector("img");
  if (own || !image) return own;
  const src = image.getAttribute("src") || "";
  const file = image.alt || decodeURIComponent(src.split(/[/=]/).pop());
  return file ? `Picture ${file}` : "Picture";
}
function nameControls() {
  const send = document.querySelector("#chat-input button[aria-label='Submit']");
  if (send) rename(send, "Send");
  for (const reset of document.querySelectorAll("button[aria-label^='Reset to default']")) {
    const label = reset.closest(".block")?.querySelector("label, [data-testid='block-info']");
    if (label) rename(reset, `Reset ${label.textContent.trim()} to its default`);
  }
  const chat = document.querySelector("#chat");
  if (!chat) return;
  const counts = {question: 0, answer: 0};
  let role = null, where = null;
  for (const part of chat.querySelectorAll(".message-row, .message-buttons")) {
    if (part.classList.contains("message-row")) {
      const now = part.classList.contains("user-row") ? "question" : "answer";
      if (now !== role) { role = now; counts[role] += 1; where = `${role} ${counts[role]}`; }
    }
    if (!where) continue;
    for (const box of part.querySelectorAll("textarea")) rename(box, `Edit ${where}`);
    for (const button of part.querySelectorAll("button")) {
      button.dataset.phi3vName ??= ownName(button);
      const base = button.dataset.phi3vName;
      if (base) rename(button, `${RENAMED[base] || base} (${where})`);
    }
  }
}
function showExampleTimes() {
  const source = document.querySelector("#example-times [data-times]");
  const times = source ? JSON.parse(source.dataset.times) : [];
  document.querySelectorAll("#chat button.example").forEach((card, number) => {
    const text = times[number] || "";
    let line = card.querySelector(".example-time");
    if (!text) { line?.remove(); return; }
    if (!line) {
      line = document.createElement("span");
      line.className = "example-time";
      (card.querySelector(".example-text-content") || card).append(line);
    }
    if (line.textContent !== text) line.textContent = text;
  });
}
// Keyboard use: when the focused control goes away (a question's Undo, Retry) or is locked
// (the input while an answer comes), focus would fall to the page; it goes back to the input
// as soon as that can be typed in. (Edit focuses its own box: focus is not lost there.) Not
// after a touch or a click: on a phone that would open the keyboard over the answer.
let lastFocused = null, byKeyboard = false, focusLost = false;
document.addEventListener("focusin", (event) => { lastFocused = event.target; }, true);
document.addEventListener("keydown", () => { byKeyboard = true; }, true);
document.addEventListener("pointerdown", () => { byKeyboard = false; }, true);
function keepKeyboardFocus() {
  const box = document.querySelector("#chat-input textarea");
  const active = document.activeElement;
  if (!box || (active && active !== document.body)) { focusLost = false; return; }
  if (lastFocused && (!lastFocused.isConnected || lastFocused.disabled)) focusLost = true;
  if (focusLost && byKeyboard && !box.disabled) {
    focusLost = false;
    box.focus({preventScroll: true});
  }
}
let visitorScrolled = false;
const scrolled = () => { visitorScrolled = true; };
for (const kind of ["wheel", "touchstart", "pointerdown", "keydown"])
  document.addEventListener(kind, scrolled, {capture: true, passive: true});
function keepEmptyChatAtTop() {
  const chat = document.querySelector("#chat");
  if (!chat) return;
  if (chat.querySelector(".message-row")) { visitorScrolled = false; return; }  // for a Clear
  if (visitorScrolled) return;
  for (const box of chat.querySelectorAll("*"))
    if (box.scrollTop > 0 && box.scrollHeight > box.clientHeight + 1) box.scrollTop = 0;
}
let updating = false;
new MutationObserver(() => {
  if (updating) return;
  updating = true;
  requestAnimationFrame(() => {
    nameControls(); explainControls(); showExampleTimes(); keepEmptyChatAtTop();
    keepKeyboardFocus();
    updating = false;
  });
}).observe(document.documentElement,
           {subtree: true, childList: true, characterData: true, attributes: true,
            attributeFilter: ["aria-label", "disabled", "class", "data-times"]});
</script>
"""
HEAD = _HEAD.replace("UPLOAD_LIMIT", str(MAX_UPLOAD_BYTES))  # the app's max_file_size
