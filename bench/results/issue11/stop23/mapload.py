# Memory and time of the applier's client-id map for a replica holding N messages (stop 23).
# usage: run.py BIN N
import asyncio, json, os, re, sqlite3, subprocess, sys, time, uuid
import websockets
BIN, N = sys.argv[1], int(sys.argv[2])
d = f"/tmp/exp/mapload/db-{N}"
subprocess.run(["rm", "-rf", d]); os.makedirs(d)
db = f"{d}/r.db"
def start():
    log = open(f"{d}/server.log", "a")
    p = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:18931", "--db", f"sqlite://{db}"], stdout=log, stderr=log)
    time.sleep(1.5)
    return p
def rss(p):
    for line in open(f"/proc/{p.pid}/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
async def talk(frames):
    async with websockets.connect("ws://127.0.0.1:18931/ws", origin="http://127.0.0.1:18931") as ws:
        await ws.recv()  # welcome
        out = []
        for f in frames:
            await ws.send(json.dumps(f))
            while True:
                r = json.loads(await ws.recv())
                if r.get("req") == f["req"]: out.append(r); break
        return out
p = start()
asyncio.run(talk([{"type": "register", "req": "1", "username": "ann", "password": "correct horse battery"}]))
asyncio.run(talk([{"type": "register", "req": "1", "username": "ben", "password": "correct horse battery"}]))
p.terminate(); p.wait()
con = sqlite3.connect(db)
ids = [r[0] for r in con.execute("SELECT id FROM users ORDER BY id")]
base = 10**9
con.execute("BEGIN")
con.executemany("INSERT INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) VALUES (?,?,?,?,?,?)",
    ((base + i, ids[i % 2], ids[1 - i % 2], str(uuid.uuid4()), "planted message %d" % i, 0) for i in range(N)))
con.execute("COMMIT"); con.close()
p = start()
before = rss(p)
t0 = time.time()
r = asyncio.run(talk([{"type": "login", "req": "1", "username": "ann", "password": "correct horse battery"},
                      {"type": "send", "req": "2", "to": "ben", "text": "hi", "client_id": str(uuid.uuid4())}]))
first_send_s = time.time() - t0
after = rss(p)
p.terminate(); p.wait()
loaded = [l for l in open(f"{d}/server.log") if "loaded the client ids" in l]
print(json.dumps({"messages": N, "rss_before_mb": round(before, 1), "rss_after_first_send_mb": round(after, 1),
                  "login_and_first_send_s": round(first_send_s, 3), "log": loaded[-1].strip() if loaded else None,
                  "reply": r[1]["type"]}))
