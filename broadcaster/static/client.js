// broadcaster.js: a browser client for broadcaster's multiplexed protocol (GET /ws).
//
//   import { connect } from "/client.js";
//   const client = connect("/ws", { token });
//   const sub = client.subscribe("news", (data, meta) => console.log(meta.seq, data));
//   await client.publish("news", { text: "hello" });
//
// The client keeps the last (epoch, seq) of each topic it follows. When the connection drops
// it reconnects with jittered exponential backoff and subscribes again with `since` that
// position, so the server replays what was missed. A seq gap within a connection (the server
// dropped messages for this client) is filled the same way: the topic is subscribed again
// with `since`, and the messages that raced the replay are skipped. Each handler sees each
// message once, in order. What the server cannot replay (another epoch after a restart, a
// history too short) is reported as a "gap" event, and the topic goes on from the live
// position. A connection closed with 1008 "token expired" is not reopened until setToken()
// gives a new token.
//
// No dependencies; served by the server at /client.js, with declarations at /client.d.ts.

const TOPIC = /^[A-Za-z0-9_.:-]{1,128}$/;
// The close that means the token is no longer good: reconnecting with it would be refused.
const TOKEN_EXPIRED = { code: 1008, reason: "token expired" };
// The errors that refuse a subscribe: the client stops following its topic.
const SUBSCRIBE_ERRORS = new Set(["forbidden_topic", "too_many_subscriptions"]);
// Replays of one gap that may come back short before the client gives up on filling it: a
// replay larger than the room the server's outbox has for this client is cut short each time.
const MAX_FILLS = 3;

/** Open a client on a multiplexed endpoint (`ws://host/ws`, or a URL relative to the page). */
export function connect(url = "ws", options = {}) {
  return new Client(url, options);
}

export class Client {
  #url;
  #token;
  #socketToken = null; // the token the current connection was opened with
  #backoffMin;
  #backoffMax;
  #pingInterval;
  #random;
  #topics = new Map(); // topic name -> Topic
  #listeners = { state: new Set(), gap: new Set(), error: new Set() };
  #socket = null;
  #state = "connecting";
  #failures = 0; // connection attempts since the server last answered
  #timer = null; // the pending reconnect or keepalive ping
  #pongs = []; // what waits for each ping's pong, in the order the pings were sent
  #waiting = []; // publishes waiting for a connection
  #acks = new Map(); // publish id -> the publish sent with it, until its ack or error
  #lastId = 0;

  constructor(url, options = {}) {
    this.#url = url;
    this.#token = options.token ?? null;
    this.#backoffMin = options.backoffMin ?? 100;
    this.#backoffMax = options.backoffMax ?? 5000;
    this.#pingInterval = options.pingInterval ?? 25000;
    this.#random = options.random ?? Math.random;
    this.#open();
  }

  /** "connecting", "connected", "disconnected" (a reconnect is scheduled), "unauthorized"
   * (waiting for setToken) or "closed". */
  get state() {
    return this.#state;
  }

  /** Call `handler(data, meta)` for every message of `topic`, from now on (or from
   * `options.since`, a stored position, or the latest `options.last` messages). */
  subscribe(topic, handler, options = {}) {
    checkTopic(topic);
    let entry = this.#topics.get(topic);
    if (entry === undefined) {
      entry = new Topic(topic, options);
      this.#topics.set(topic, entry);
      this.#join(entry);
    }
    entry.handlers.add(handler);
    const client = this;
    return {
      topic,
      get position() {
        return entry.position && { ...entry.position };
      },
      unsubscribe() {
        client.#unsubscribe(entry, handler);
      },
    };
  }

  /** Publish a JSON value to `topic`; resolves with its position ({topic, epoch, seq}) once
   * the server has numbered it, rejects if it refused it or if the connection was lost
   * before it answered (the message may or may not have gone out: it is not sent again). */
  publish(topic, data) {
    checkTopic(topic);
    return new Promise((resolve, reject) => {
      const publish = { topic, data, resolve, reject };
      if (this.#state === "closed") {
        reject(new BroadcasterError("closed", "the client is closed"));
      } else if (this.#state === "connected") {
        this.#sendPublish(publish);
      } else {
        this.#waiting.push(publish);
      }
    });
  }

  /** Listen to "state" (state, {code, reason}), "gap" ({topic, after, resumed}) or
   * "error" (BroadcasterError); returns a function that removes the listener. */
  on(event, listener) {
    const listeners = this.#listeners[event];
    if (listeners === undefined) throw new TypeError(`unknown event: ${event}`);
    listeners.add(listener);
    return () => listeners.delete(listener);
  }

  /** Use `token` from the next connection on; after a "token expired" close, reconnect now. */
  setToken(token) {
    this.#token = token;
    if (this.#state === "unauthorized") {
      this.#failures = 0;
      this.#open();
    }
  }

  /** Close the connection (1000) for good; waiting publishes are rejected. */
  close() {
    if (this.#state === "closed") return;
    clearTimeout(this.#timer);
    const socket = this.#socket;
    this.#socket = null;
    this.#setState("closed", {});
    this.#lose(new BroadcasterError("closed", "the client is closed"));
    this.#rejectWaiting(new BroadcasterError("closed", "the client is closed"));
    if (socket !== null) socket.close(1000);
  }

  #open() {
    this.#setState("connecting", {});
    const socket = new WebSocket(this.#endpoint());
    this.#socket = socket;
    this.#socketToken = this.#token;
    socket.onopen = () => {
      for (const entry of this.#topics.values()) this.#sendSubscribe(entry);
      // The pong says every subscribe above has taken effect: the client is connected.
      this.#ping(() => {
        this.#failures = 0;
        this.#setState("connected", {});
        for (const entry of this.#topics.values()) this.#checkReplay(entry);
        const waiting = this.#waiting.splice(0);
        for (const publish of waiting) this.#sendPublish(publish);
      });
    };
    socket.onmessage = (event) => this.#receive(event.data);
    socket.onclose = (event) => {
      if (this.#socket !== socket) return; // closed by close(), or replaced
      this.#socket = null;
      clearTimeout(this.#timer);
      this.#lost(event.code, event.reason);
    };
  }

  #endpoint() {
    const url = new URL(this.#url, globalThis.location?.href);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    // A browser cannot set headers on a handshake: the server reads the token from the query.
    if (this.#token !== null) url.searchParams.set("token", this.#token);
    return url.href;
  }

  #lost(code, reason) {
    this.#lose(new BroadcasterError("connection_lost", `connection closed (${code})`));
    for (const entry of this.#topics.values()) entry.reset();
    const expired = code === TOKEN_EXPIRED.code && reason === TOKEN_EXPIRED.reason;
    if (expired && this.#token === this.#socketToken) {
      this.#setState("unauthorized", { code, reason });
      return;
    }
    // Every other close is worth another try, 1001 (shutting down) and 1013 (try again
    // later) among them, and so is an expired token already replaced by setToken. A refused
    // handshake looks like any lost connection to a page.
    this.#setState("disconnected", { code, reason });
    const delay = Math.min(this.#backoffMax, this.#backoffMin * 2 ** this.#failures);
    this.#failures += 1;
    this.#timer = setTimeout(() => this.#open(), delay / 2 + (this.#random() * delay) / 2);
  }

  #receive(text) {
    if (typeof text !== "string") return; // the multiplexed endpoint sends text only
    const value = JSON.parse(text);
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== null && typeof item === "object") this.#handle(item);
    }
  }

  #handle(item) {
    switch (item.op) {
      case undefined:
        return this.#message(item);
      case "subscribed":
        return this.#subscribed(item);
      case "pong":
        return this.#pongs.shift()?.answered();
      case "ack":
        return this.#acked(item);
      case "error":
        return this.#error(item);
      default:
        return undefined; // "unsubscribed", and ops of later versions
    }
  }

  #message(item) {
    const entry = this.#topics.get(item.topic);
    if (entry === undefined || entry.filling || entry.position === null) return;
    const { epoch, seq: last } = entry.position;
    const seq = item.seq;
    if (last !== null && seq <= last) return; // already delivered: a replay that overlaps
    if (last !== null && seq > last + 1 && entry.fills < MAX_FILLS) {
      entry.fills += 1;
      entry.filling = true; // skip what races the replay until the server acknowledges it
      this.#join(entry);
      return;
    }
    if (last !== null && seq > last + 1) {
      this.#giveUp(entry, seq - 1);
    }
    entry.fills = 0;
    entry.position = { epoch, seq };
    const meta = { topic: entry.name, epoch, seq, replayed: seq <= entry.replayedUntil };
    const data = item.encoding === "base64" ? decodeBase64(item.data) : item.data;
    for (const handler of [...entry.handlers]) {
      try {
        handler(data, meta);
      } catch (error) {
        this.#emit("error", new BroadcasterError("handler_failed", String(error), error));
      }
    }
  }

  #subscribed(item) {
    const entry = this.#topics.get(item.topic);
    if (entry === undefined || typeof item.epoch !== "string") return;
    entry.pending = false;
    entry.filling = false;
    const before = entry.position;
    if (item.recovered === true) {
      // The replay follows: messages up to item.seq. A rewind (`last`) starts at its first.
      entry.replayedUntil = item.seq;
      if (before === null) entry.position = { epoch: item.epoch, seq: null };
      return;
    }
    entry.replayedUntil = 0;
    entry.fills = 0;
    entry.position = { epoch: item.epoch, seq: item.seq };
    if (before !== null) {
      this.#emit("gap", { topic: entry.name, after: before, resumed: { ...entry.position } });
    }
  }

  #acked(item) {
    const publish = this.#acks.get(item.id);
    if (publish === undefined) return;
    this.#acks.delete(item.id);
    publish.resolve({ topic: item.topic, epoch: item.epoch, seq: item.seq });
  }

  #error(item) {
    const error = new BroadcasterError(item.error, item.detail);
    // An error frame names the publish it refuses by its id, and the subscribe by its topic.
    const publish = this.#acks.get(item.id);
    if (publish !== undefined) {
      this.#acks.delete(item.id);
      publish.reject(error);
      return;
    }
    const entry = this.#topics.get(item.topic);
    if (entry !== undefined) {
      error.topic = entry.name;
      if (entry.pending && SUBSCRIBE_ERRORS.has(item.error)) this.#topics.delete(entry.name);
    }
    this.#emit("error", error);
  }

  // Subscribe to `entry` where the client left it, then check that the replay came whole.
  #join(entry) {
    if (this.#sendSubscribe(entry)) this.#ping(() => this.#checkReplay(entry));
  }

  // On a pong, the answer to every subscribe sent before its ping has arrived, replay
  // included. A replay that fell short of the position the server acknowledged lost
  // messages to the overflow policy: they are asked for again.
  #checkReplay(entry) {
    if (this.#topics.get(entry.name) !== entry || entry.pending || entry.filling) return;
    const position = entry.position;
    if (position === null || position.seq === null || position.seq >= entry.replayedUntil) {
      return;
    }
    if (entry.fills < MAX_FILLS) {
      entry.fills += 1;
      entry.filling = true;
      this.#join(entry);
    } else {
      this.#giveUp(entry, entry.replayedUntil);
    }
  }

  // Report what the replays could not bring and go on from `seq`.
  #giveUp(entry, seq) {
    const after = entry.position;
    entry.fills = 0;
    entry.position = { epoch: after.epoch, seq };
    this.#emit("gap", { topic: entry.name, after, resumed: { ...entry.position } });
  }

  // Send the subscribe that (re)joins `entry` where the client left it; without a connection,
  // the next one sends it. Returns whether it was sent.
  #sendSubscribe(entry) {
    const frame = { op: "subscribe", topic: entry.name };
    if (entry.position !== null && entry.position.seq !== null) {
      frame.since = { ...entry.position };
    } else if (entry.position === null && entry.last !== null) {
      frame.last = entry.last;
    }
    entry.pending = this.#send(frame);
    return entry.pending;
  }

  #unsubscribe(entry, handler) {
    entry.handlers.delete(handler);
    if (entry.handlers.size > 0 || this.#topics.get(entry.name) !== entry) return;
    this.#topics.delete(entry.name);
    this.#send({ op: "unsubscribe", topic: entry.name });
  }

  // Publish with an id: the server answers it with an ack (the message's position) or an
  // error frame carrying the same id.
  #sendPublish(publish) {
    const id = ++this.#lastId;
    this.#acks.set(id, publish);
    this.#send({ op: "publish", topic: publish.topic, data: publish.data, id });
  }

  // Send a ping and call `answered` on its pong. A ping also goes pingInterval after the
  // last one, and a connection that leaves one unanswered that long is closed.
  #ping(answered) {
    this.#pongs.push({ answered });
    this.#send({ op: "ping" });
    this.#keepalive();
  }

  #keepalive() {
    clearTimeout(this.#timer);
    const socket = this.#socket;
    this.#timer = setTimeout(() => {
      if (this.#pongs.length > 0) {
        socket.close(4000, "pong timeout"); // the close event follows, and a reconnect
        this.#socket = null;
        this.#lost(4000, "pong timeout");
      } else {
        this.#ping(() => {});
      }
    }, this.#pingInterval);
  }

  #send(frame) {
    if (this.#socket === null || this.#socket.readyState !== WebSocket.OPEN) return false;
    this.#socket.send(JSON.stringify(frame));
    return true;
  }

  // Forget the lost connection's pongs, and fail the publishes it had not answered: the
  // server may or may not have published them.
  #lose(error) {
    this.#pongs.splice(0);
    for (const publish of this.#acks.values()) publish.reject(error);
    this.#acks.clear();
  }

  #rejectWaiting(error) {
    for (const publish of this.#waiting.splice(0)) publish.reject(error);
  }

  #setState(state, detail) {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit("state", state, detail);
  }

  #emit(event, ...args) {
    for (const listener of [...this.#listeners[event]]) listener(...args);
  }
}

/** An error from the server ({"op": "error"}), or from the client itself. */
export class BroadcasterError extends Error {
  constructor(code, detail, cause) {
    super(`${code}: ${detail}`, cause === undefined ? undefined : { cause });
    this.name = "BroadcasterError";
    this.code = code;
    this.detail = detail;
    this.topic = null;
  }
}

// What the client knows of one topic it follows.
class Topic {
  constructor(name, options) {
    this.name = name;
    this.handlers = new Set();
    this.last = options.last ?? null;
    // The last message delivered: {epoch, seq}; seq is null after a rewind's acknowledgement,
    // until its first message.
    this.position = options.since ? { epoch: options.since.epoch, seq: options.since.seq } : null;
    this.pending = false; // a subscribe is waiting for its acknowledgement
    this.filling = false; // re-subscribed after a gap: skip messages until acknowledged
    this.fills = 0; // replays of the current gap so far
    this.replayedUntil = 0; // messages up to this seq are a replay
  }

  reset() {
    this.pending = false;
    this.filling = false;
    this.fills = 0;
    if (this.position !== null && this.position.seq === null) this.position = null;
  }
}

function checkTopic(topic) {
  if (typeof topic !== "string" || !TOPIC.test(topic)) {
    throw new TypeError("a topic is 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', ':' and '-'");
  }
}

function decodeBase64(text) {
  return Uint8Array.from(atob(text), (char) => char.charCodeAt(0));
}
