package gpudispatch.nacos;

import com.alibaba.nacos.common.model.RestResult;
import com.alibaba.nacos.consistency.ProtocolMetaData;
import com.alibaba.nacos.consistency.cp.CPProtocol;
import com.alibaba.nacos.consistency.cp.RequestProcessor4CP;
import com.alibaba.nacos.consistency.entity.ReadRequest;
import com.alibaba.nacos.consistency.entity.Response;
import com.alibaba.nacos.consistency.entity.WriteRequest;
import com.alibaba.nacos.core.cluster.ServerMemberManager;
import com.alibaba.nacos.core.distributed.AbstractConsistencyProtocol;
import com.alibaba.nacos.core.distributed.raft.JRaftProtocol;
import com.alibaba.nacos.core.distributed.raft.JRaftServer;
import com.alibaba.nacos.core.distributed.raft.RaftConfig;
import com.alibaba.nacos.sys.utils.ApplicationUtils;
import java.lang.reflect.Field;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.util.Collection;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.CompletableFuture;

/**
 * Nacos's CP protocol (JRaft) with its Raft groups back.
 *
 * <p>The com.pig4cloud.nacos republish of nacos-core 2.0.4 is the Nacos source but for one method:
 * {@code JRaftProtocol.addRequestProcessors} has an empty body, so no module can create its Raft
 * group (naming's {@code naming_instance_metadata}, {@code naming_service_metadata} and
 * {@code naming_persistent_service_v2}; config's {@code nacos_config} in cluster mode), and every
 * write through one fails with "No corresponding Raft Group found". Upstream's body is one line,
 * {@code raftServer.createMultiRaftGroup(processors)}; this protocol does exactly that and hands
 * everything else to the republished {@link JRaftProtocol} unchanged.
 *
 * <p>How it is picked: Nacos builds its CP protocol with Java's service loader before falling back
 * to {@code new JRaftProtocol(memberManager)} ({@code ConsistencyConfiguration}), so this class is
 * named in {@code META-INF/services/com.alibaba.nacos.consistency.cp.CPProtocol}. The service loader
 * needs a constructor without arguments, so the member manager comes from the Spring context, which
 * has already built it (it is the protocol bean's own dependency). Nacos reads the protocol's config
 * type from the generic superclass ({@code ProtocolManager} resolves {@code RaftConfig} from it), so
 * this class extends {@link AbstractConsistencyProtocol} itself and delegates rather than
 * subclassing {@code JRaftProtocol}.
 */
public class RaftGroupsProtocol extends AbstractConsistencyProtocol<RaftConfig, RequestProcessor4CP>
        implements CPProtocol<RaftConfig, RequestProcessor4CP> {

    private final JRaftProtocol delegate;

    private final JRaftServer server;

    private final Method createGroups;

    public RaftGroupsProtocol() throws Exception {
        this.delegate = new JRaftProtocol(ApplicationUtils.getBean(ServerMemberManager.class));
        Field field = JRaftProtocol.class.getDeclaredField("raftServer");
        field.setAccessible(true);
        this.server = (JRaftServer) field.get(delegate);
        this.createGroups = JRaftServer.class.getDeclaredMethod("createMultiRaftGroup", Collection.class);
        this.createGroups.setAccessible(true);
    }

    /** Upstream's body: one Raft group per processor (queued until the Raft server has started). */
    @Override
    public void addRequestProcessors(Collection<RequestProcessor4CP> processors) {
        try {
            createGroups.invoke(server, processors);
        } catch (InvocationTargetException e) {
            Throwable cause = e.getCause();
            if (cause instanceof RuntimeException) {
                throw (RuntimeException) cause;
            }
            throw new IllegalStateException("creating Raft groups failed", cause);
        } catch (IllegalAccessException e) {
            throw new IllegalStateException("cannot reach JRaftServer.createMultiRaftGroup", e);
        }
    }

    @Override
    public void init(RaftConfig config) {
        delegate.init(config);
    }

    @Override
    public ProtocolMetaData protocolMetaData() {
        return delegate.protocolMetaData();
    }

    @Override
    public Response getData(ReadRequest request) throws Exception {
        return delegate.getData(request);
    }

    @Override
    public CompletableFuture<Response> aGetData(ReadRequest request) {
        return delegate.aGetData(request);
    }

    @Override
    public Response write(WriteRequest request) throws Exception {
        return delegate.write(request);
    }

    @Override
    public CompletableFuture<Response> writeAsync(WriteRequest request) {
        return delegate.writeAsync(request);
    }

    @Override
    public void memberChange(Set<String> addresses) {
        delegate.memberChange(addresses);
    }

    @Override
    public void shutdown() {
        delegate.shutdown();
    }

    @Override
    public RestResult<String> execute(Map<String, String> args) {
        return delegate.execute(args);
    }

    @Override
    public boolean isLeader(String group) {
        return delegate.isLeader(group);
    }
}
