# slowreader.py ADDR PORT: accepts one connection, reads it at about
# 6.4 MB/s (64 KiB every 10 ms) to its end, and prints the bytes read.
import socket, sys, time

l = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(1)
print('listening', flush=True)
c, _ = l.accept()
n = 0
while True:
    time.sleep(0.01)
    b = c.recv(65536)
    if not b:
        break
    n += len(b)
print(n, flush=True)
