// Type declarations of broadcaster.js, the browser client served at /client.js.

/** Where a client is in a topic's stream: the last `seq` it has in `epoch`. */
export interface Position {
  epoch: string;
  seq: number;
}

/** Where a published message went: its topic's epoch and its seq in it. */
export interface Receipt {
  topic: string;
  epoch: string;
  seq: number;
}

/** What comes with each message. */
export interface Meta {
  topic: string;
  epoch: string;
  seq: number;
  /** The message was replayed from history (after a reconnect, a gap or a rewind). */
  replayed: boolean;
}

/** Messages of `topic` after `after` were lost; the stream goes on from `resumed`. */
export interface Gap {
  topic: string;
  after: Position;
  resumed: Position;
}

export type State = "connecting" | "connected" | "disconnected" | "unauthorized" | "closed";

/** The close that led to a state, when there was one. */
export interface StateDetail {
  code?: number;
  reason?: string;
}

export interface Options {
  /** A JWT or publish token, sent as the `token` query parameter. */
  token?: string;
  /** Milliseconds before the first reconnect (100); doubled per failed try. */
  backoffMin?: number;
  /** Most milliseconds between reconnects (5000); each delay is half fixed, half random. */
  backoffMax?: number;
  /** Milliseconds between keepalive pings (25000); one unanswered that long drops the
   * connection, and the client reconnects. */
  pingInterval?: number;
  /** Returns a number in [0, 1) for the backoff's jitter (Math.random). */
  random?: () => number;
}

export interface SubscribeOptions {
  /** Resume from a stored position: the server replays what followed it. */
  since?: Position;
  /** Start with the latest `last` messages of the topic's history. */
  last?: number;
}

export type Handler<T = unknown> = (data: T, meta: Meta) => void;

export interface Subscription {
  readonly topic: string;
  /** The last message delivered, or null before the first. */
  readonly position: Position | null;
  unsubscribe(): void;
}

export class BroadcasterError extends Error {
  /** The server's error code (`forbidden_topic`...), or the client's own (`closed`,
   * `connection_lost`, `handler_failed`). */
  readonly code: string;
  readonly detail: string;
  /** The topic of the command refused; after a refused subscribe, the client stops
   * following it. */
  topic: string | null;
}

export class Client {
  constructor(url: string, options?: Options);
  readonly state: State;
  subscribe<T = unknown>(topic: string, handler: Handler<T>, options?: SubscribeOptions): Subscription;
  /** Resolves with the position the server gave the message. */
  publish(topic: string, data: unknown): Promise<Receipt>;
  on(event: "state", listener: (state: State, detail: StateDetail) => void): () => void;
  on(event: "gap", listener: (gap: Gap) => void): () => void;
  on(event: "error", listener: (error: BroadcasterError) => void): () => void;
  setToken(token: string): void;
  close(): void;
}

/** Open a client on a multiplexed endpoint (`ws://host/ws`, or a URL relative to the page). */
export function connect(url?: string, options?: Options): Client;
